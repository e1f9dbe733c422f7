//! The columns `kubectl get` shows for built-in kinds, computed as the real API server's
//! table printers compute them (k8s.io/kubernetes `pkg/printers/internalversion`), for the
//! kinds a DR operator reads: Pods, Deployments, StatefulSets, Jobs, PVCs, PVs, Services,
//! ConfigMaps, Secrets, Namespaces, Leases and VolumeSnapshots (whose columns follow the
//! external-snapshotter CRD's `additionalPrinterColumns`). Name and Age are added by
//! [`super::table`].

use serde_json::{json, Value};

/// A built-in kind's columns between NAME and AGE: (name, type) each, and its cells.
pub struct Printer {
    /// Column names and OpenAPI types (`string`, `integer`).
    pub columns: &'static [(&'static str, &'static str)],
    /// The cells of one object, one per column.
    pub cells: fn(&Value) -> Vec<Value>,
}

/// The printer for built-in `kind` of `group`, if the lab has one.
pub fn for_kind(group: &str, kind: &str) -> Option<Printer> {
    let printer = match (group, kind) {
        ("", "Pod") => Printer {
            columns: &[
                ("Ready", "string"),
                ("Status", "string"),
                ("Restarts", "integer"),
            ],
            cells: pod,
        },
        ("apps", "Deployment") => Printer {
            columns: &[
                ("Ready", "string"),
                ("Up-to-date", "integer"),
                ("Available", "integer"),
            ],
            cells: |o| {
                vec![
                    ready_of(o, "readyReplicas"),
                    count(&o["status"]["updatedReplicas"]),
                    count(&o["status"]["availableReplicas"]),
                ]
            },
        },
        ("apps", "StatefulSet") => Printer {
            columns: &[("Ready", "string")],
            cells: |o| vec![ready_of(o, "readyReplicas")],
        },
        ("batch", "Job") => Printer {
            columns: &[("Status", "string"), ("Completions", "string")],
            cells: job,
        },
        ("", "PersistentVolumeClaim") => Printer {
            columns: &[
                ("Status", "string"),
                ("Volume", "string"),
                ("Capacity", "string"),
                ("Access Modes", "string"),
                ("StorageClass", "string"),
            ],
            cells: |o| {
                vec![
                    text(&o["status"]["phase"]),
                    text(&o["spec"]["volumeName"]),
                    text(&o["status"]["capacity"]["storage"]),
                    access_modes(&o["status"]["accessModes"]),
                    text(&o["spec"]["storageClassName"]),
                ]
            },
        },
        ("", "PersistentVolume") => Printer {
            columns: &[
                ("Capacity", "string"),
                ("Access Modes", "string"),
                ("Reclaim Policy", "string"),
                ("Status", "string"),
                ("Claim", "string"),
                ("StorageClass", "string"),
            ],
            cells: |o| {
                let claim = &o["spec"]["claimRef"];
                let claim = match (claim["namespace"].as_str(), claim["name"].as_str()) {
                    (Some(ns), Some(name)) => format!("{ns}/{name}"),
                    _ => String::new(),
                };
                vec![
                    text(&o["spec"]["capacity"]["storage"]),
                    access_modes(&o["spec"]["accessModes"]),
                    text(&o["spec"]["persistentVolumeReclaimPolicy"]),
                    text(&o["status"]["phase"]),
                    json!(claim),
                    text(&o["spec"]["storageClassName"]),
                ]
            },
        },
        ("", "Service") => Printer {
            columns: &[
                ("Type", "string"),
                ("Cluster-IP", "string"),
                ("External-IP", "string"),
                ("Port(s)", "string"),
            ],
            cells: service,
        },
        ("", "ConfigMap") => Printer {
            columns: &[("Data", "integer")],
            cells: |o| vec![json!(entries(&o["data"]) + entries(&o["binaryData"]))],
        },
        ("", "Secret") => Printer {
            columns: &[("Type", "string"), ("Data", "integer")],
            cells: |o| vec![text(&o["type"]), json!(entries(&o["data"]))],
        },
        ("", "Namespace") => Printer {
            columns: &[("Status", "string")],
            cells: |o| vec![text(&o["status"]["phase"])],
        },
        ("coordination.k8s.io", "Lease") => Printer {
            columns: &[("Holder", "string")],
            cells: |o| vec![text(&o["spec"]["holderIdentity"])],
        },
        ("snapshot.storage.k8s.io", "VolumeSnapshot") => Printer {
            columns: &[
                ("ReadyToUse", "boolean"),
                ("SourcePVC", "string"),
                ("RestoreSize", "string"),
                ("SnapshotClass", "string"),
                ("SnapshotContent", "string"),
            ],
            cells: |o| {
                vec![
                    o["status"]["readyToUse"].clone(),
                    text(&o["spec"]["source"]["persistentVolumeClaimName"]),
                    text(&o["status"]["restoreSize"]),
                    text(&o["spec"]["volumeSnapshotClassName"]),
                    text(&o["status"]["boundVolumeSnapshotContentName"]),
                ]
            },
        },
        _ => return None,
    };
    Some(printer)
}

/// A string cell; absent values print as `<none>` where kubectl would.
fn text(v: &Value) -> Value {
    match v {
        Value::String(s) if !s.is_empty() => json!(s),
        Value::Null | Value::String(_) => json!("<none>"),
        other => json!(other.to_string()),
    }
}

fn count(v: &Value) -> Value {
    json!(v.as_i64().unwrap_or(0))
}

fn entries(v: &Value) -> usize {
    v.as_object().map_or(0, serde_json::Map::len)
}

/// `ready/desired` for a workload; desired defaults to 1, as `spec.replicas` does.
fn ready_of(o: &Value, field: &str) -> Value {
    let desired = o["spec"]["replicas"].as_i64().unwrap_or(1);
    json!(format!(
        "{}/{desired}",
        o["status"][field].as_i64().unwrap_or(0)
    ))
}

/// `RWO,ROX,RWX,RWOP`, as kubectl abbreviates access modes.
fn access_modes(v: &Value) -> Value {
    let modes: Vec<&str> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|m| match m {
            "ReadWriteOnce" => "RWO",
            "ReadOnlyMany" => "ROX",
            "ReadWriteMany" => "RWX",
            "ReadWriteOncePod" => "RWOP",
            other => other,
        })
        .collect();
    json!(modes.join(","))
}

/// READY (ready/all containers), STATUS (Terminating, a container's waiting or terminated
/// reason, else the phase) and RESTARTS (summed), as the pod printer computes them.
fn pod(o: &Value) -> Vec<Value> {
    let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
    let statuses = o["status"]["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ready = statuses.iter().filter(|s| s["ready"] == true).count();
    let restarts: i64 = statuses
        .iter()
        .filter_map(|s| s["restartCount"].as_i64())
        .sum();
    let reason = statuses.iter().find_map(|s| {
        s["state"]["waiting"]["reason"]
            .as_str()
            .or_else(|| s["state"]["terminated"]["reason"].as_str())
    });
    let status = if o["metadata"]["deletionTimestamp"].is_string() {
        "Terminating".to_string()
    } else if let Some(reason) = reason {
        reason.to_string()
    } else {
        o["status"]["phase"]
            .as_str()
            .unwrap_or("Pending")
            .to_string()
    };
    vec![
        json!(format!("{ready}/{total}")),
        json!(status),
        json!(restarts),
    ]
}

fn job(o: &Value) -> Vec<Value> {
    let conditions = o["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let holds = |t: &str| {
        conditions
            .iter()
            .any(|c| c["type"] == t && c["status"] == "True")
    };
    let status = if holds("Complete") {
        "Complete"
    } else if holds("Failed") {
        "Failed"
    } else {
        "Running"
    };
    let completions = o["spec"]["completions"].as_i64().unwrap_or(1);
    let succeeded = o["status"]["succeeded"].as_i64().unwrap_or(0);
    vec![json!(status), json!(format!("{succeeded}/{completions}"))]
}

fn service(o: &Value) -> Vec<Value> {
    let ports: Vec<String> = o["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let protocol = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_i64() {
                Some(node) => format!("{}:{node}/{protocol}", p["port"]),
                None => format!("{}/{protocol}", p["port"]),
            }
        })
        .collect();
    let ports = if ports.is_empty() {
        "<none>".to_string()
    } else {
        ports.join(",")
    };
    vec![
        json!(o["spec"]["type"].as_str().unwrap_or("ClusterIP")),
        text(&o["spec"]["clusterIP"]),
        json!("<none>"),
        json!(ports),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_and_deployment_cells_follow_kubectl() {
        let p = for_kind("", "Pod").unwrap();
        let pod = json!({
            "metadata": {"name": "web-1"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 0, "state": {"running": {}}},
                {"name": "b", "ready": false, "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff"}}},
            ]},
        });
        assert_eq!(
            (p.cells)(&pod),
            vec![json!("1/2"), json!("CrashLoopBackOff"), json!(3)]
        );
        let d = for_kind("apps", "Deployment").unwrap();
        let deploy = json!({"spec": {"replicas": 2}, "status": {"readyReplicas": 1, "updatedReplicas": 2, "availableReplicas": 1}});
        assert_eq!((d.cells)(&deploy), vec![json!("1/2"), json!(2), json!(1)]);
        assert_eq!(d.columns.len(), (d.cells)(&deploy).len());
        let pvc = for_kind("", "PersistentVolumeClaim").unwrap();
        let claim = json!({"spec": {"volumeName": "pv-1", "storageClassName": "lab"}, "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"]}});
        assert_eq!(
            (pvc.cells)(&claim),
            vec![
                json!("Bound"),
                json!("pv-1"),
                json!("1Gi"),
                json!("RWO"),
                json!("lab")
            ]
        );
        assert!(for_kind("apps", "Unknown").is_none());
    }
}
