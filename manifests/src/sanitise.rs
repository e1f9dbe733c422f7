//! Strips what the source cluster wrote into captured objects, so they can be created anew at
//! the destination.

use std::collections::HashSet;

use serde_json::Value;

use super::object::{is, object_at_mut, remove_and_prune, str_at};

/// `metadata` fields the API server owns (Kubernetes API conventions, "Metadata"): set by the
/// server on create or update, rejected or meaningless on another cluster.
pub const SERVER_METADATA_FIELDS: [&str; 8] = [
    "uid",
    "resourceVersion",
    "managedFields",
    "creationTimestamp",
    "generation",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// Annotations written by tools and controllers on the source, dropped from every object:
/// kubectl's client-side apply record and the Deployment controller's revision counter.
pub const DROPPED_ANNOTATIONS: [&str; 2] = [
    "kubectl.kubernetes.io/last-applied-configuration",
    "deployment.kubernetes.io/revision",
];

/// PersistentVolumeClaim annotations written by the PV controller and external-provisioner
/// when the claim was bound on the source; kept, they would stop the destination from
/// provisioning and binding its own volume.
pub const DROPPED_PVC_ANNOTATIONS: [&str; 5] = [
    "pv.kubernetes.io/bind-completed",
    "pv.kubernetes.io/bound-by-controller",
    "volume.beta.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/selected-node",
];

/// Job pod-template labels the API server adds when it generates a Job's selector from the
/// Job's uid (`spec.manualSelector` unset); they name the source Job's uid.
pub const JOB_CONTROLLER_UID_LABELS: [&str; 2] =
    ["controller-uid", "batch.kubernetes.io/controller-uid"];

/// Removes from full API objects everything the source cluster assigned, so the result can be
/// created at the destination as new objects. Pure: same input, same output; order kept.
///
/// `objects` are full objects as the API returns them (`apiVersion`, `kind`, `metadata`, ...),
/// and must be the complete set that is shipped: owner references are kept only when they
/// point at one of them. Removed, for every object:
///
/// - `metadata`: [`SERVER_METADATA_FIELDS`] and the [`DROPPED_ANNOTATIONS`];
/// - `metadata.ownerReferences` whose `uid` is not the uid of an object in `objects` (matched
///   before uids are dropped). References that are kept still carry the *source* uid: whoever
///   creates the objects at the destination must rewrite `uid` to the new owner's, or the
///   garbage collector deletes the dependent;
/// - `status`, whole: the destination's controllers write their own.
///
/// And per kind (following what the Kubernetes API allocates or defaults on create):
///
/// - Service: `spec.clusterIP` and `spec.clusterIPs` (allocated from the source's service
///   CIDR) unless the Service is headless (`clusterIP: None`, kept: it is a choice, not an
///   allocation), `spec.healthCheckNodePort`, and every `spec.ports[].nodePort`;
/// - PersistentVolumeClaim: `spec.volumeName` (the source's PV) and the
///   [`DROPPED_PVC_ANNOTATIONS`];
/// - Job without `spec.manualSelector: true`: `spec.selector` and the
///   [`JOB_CONTROLLER_UID_LABELS`] in `spec.template.metadata.labels` (the API server generates
///   them again from the new Job's uid, and rejects a Job whose selector names another uid);
/// - Pod: `spec.nodeName` (the source's node).
///
/// Objects emptied of all annotations, labels or owner references lose the empty field.
#[must_use]
pub fn sanitise(objects: Vec<Value>) -> Vec<Value> {
    let shipped_uids: HashSet<String> = objects
        .iter()
        .map(|o| str_at(&o["metadata"], "uid"))
        .filter(|uid| !uid.is_empty())
        .map(String::from)
        .collect();
    objects
        .into_iter()
        .map(|mut object| {
            sanitise_one(&mut object, &shipped_uids);
            object
        })
        .collect()
}

fn sanitise_one(object: &mut Value, shipped_uids: &HashSet<String>) {
    if let Some(meta) = object_at_mut(object, &["metadata"]) {
        for field in SERVER_METADATA_FIELDS {
            meta.remove(field);
        }
        if let Some(Value::Array(owners)) = meta.get_mut("ownerReferences") {
            owners.retain(|owner| shipped_uids.contains(str_at(owner, "uid")));
            if owners.is_empty() {
                meta.remove("ownerReferences");
            }
        }
    }
    for annotation in DROPPED_ANNOTATIONS {
        remove_and_prune(object, &["metadata", "annotations"], annotation);
    }
    if let Some(top) = object.as_object_mut() {
        top.remove("status");
    }

    if is(object, "", "Service") {
        sanitise_service(object);
    } else if is(object, "", "PersistentVolumeClaim") {
        remove_and_prune(object, &["spec"], "volumeName");
        for annotation in DROPPED_PVC_ANNOTATIONS {
            remove_and_prune(object, &["metadata", "annotations"], annotation);
        }
    } else if is(object, "batch", "Job") {
        let manual = object["spec"]["manualSelector"].as_bool() == Some(true);
        if !manual {
            remove_and_prune(object, &["spec"], "selector");
            for label in JOB_CONTROLLER_UID_LABELS {
                remove_and_prune(object, &["spec", "template", "metadata", "labels"], label);
            }
        }
    } else if is(object, "", "Pod") {
        remove_and_prune(object, &["spec"], "nodeName");
    }
}

fn sanitise_service(service: &mut Value) {
    let Some(spec) = object_at_mut(service, &["spec"]) else {
        return;
    };
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None")
        || spec
            .get("clusterIPs")
            .and_then(Value::as_array)
            .is_some_and(|ips| ips.first().and_then(Value::as_str) == Some("None"));
    if !headless {
        spec.remove("clusterIP");
        spec.remove("clusterIPs");
    }
    spec.remove("healthCheckNodePort");
    if let Some(Value::Array(ports)) = spec.get_mut("ports") {
        for port in ports.iter_mut().filter_map(Value::as_object_mut) {
            port.remove("nodePort");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Metadata the API server fills in for every object, with `uid`.
    fn server_meta(name: &str, uid: &str) -> Value {
        json!({
            "name": name,
            "namespace": "shop",
            "uid": uid,
            "resourceVersion": "4711",
            "generation": 3,
            "creationTimestamp": "2025-01-02T03:04:05Z",
            "selfLink": format!("/api/v1/namespaces/shop/x/{name}"),
            "managedFields": [{"manager": "kubectl", "operation": "Update"}],
            "labels": {"app": "shop"},
        })
    }

    fn with_meta(mut object: Value, meta: Value) -> Value {
        let mut merged = meta;
        for (k, v) in object["metadata"].as_object().cloned().unwrap_or_default() {
            merged[k] = v;
        }
        object["metadata"] = merged;
        object
    }

    struct Case {
        name: &'static str,
        input: Value,
        want: Value,
    }

    fn cases() -> Vec<Case> {
        vec![
            Case {
                name: "deployment loses server metadata, revision, last-applied and status",
                input: with_meta(
                    json!({
                        "apiVersion": "apps/v1", "kind": "Deployment",
                        "metadata": {"annotations": {
                            "deployment.kubernetes.io/revision": "7",
                            "kubectl.kubernetes.io/last-applied-configuration": "{}",
                            "team": "payments"}},
                        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "shop"}},
                                 "template": {"metadata": {"labels": {"app": "shop"}},
                                              "spec": {"containers": [{"name": "web", "image": "nginx"}]}}},
                        "status": {"replicas": 3, "readyReplicas": 3, "observedGeneration": 3}
                    }),
                    server_meta("web", "uid-web"),
                ),
                want: json!({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "shop"},
                                 "annotations": {"team": "payments"}},
                    "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "shop"}},
                             "template": {"metadata": {"labels": {"app": "shop"}},
                                          "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}
                }),
            },
            Case {
                name: "service loses allocated IPs and node ports",
                input: with_meta(
                    json!({
                        "apiVersion": "v1", "kind": "Service", "metadata": {},
                        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.3.4", "clusterIPs": ["10.96.3.4"],
                                 "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000,
                                 "selector": {"app": "shop"},
                                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
                                           {"name": "https", "port": 443, "nodePort": 30443}]},
                        "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}
                    }),
                    server_meta("web", "uid-svc"),
                ),
                want: json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "shop"}},
                    "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                             "selector": {"app": "shop"},
                             "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                                       {"name": "https", "port": 443}]}
                }),
            },
            Case {
                name: "headless service keeps clusterIP None",
                input: with_meta(
                    json!({
                        "apiVersion": "v1", "kind": "Service", "metadata": {},
                        "spec": {"clusterIP": "None", "clusterIPs": ["None"], "selector": {"app": "db"},
                                 "ports": [{"port": 5432}]}
                    }),
                    server_meta("db", "uid-db-svc"),
                ),
                want: json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "db", "namespace": "shop", "labels": {"app": "shop"}},
                    "spec": {"clusterIP": "None", "clusterIPs": ["None"], "selector": {"app": "db"},
                             "ports": [{"port": 5432}]}
                }),
            },
            Case {
                name: "bound pvc loses its volume and binding annotations, keeps its class",
                input: with_meta(
                    json!({
                        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": {"annotations": {
                            "pv.kubernetes.io/bind-completed": "yes",
                            "pv.kubernetes.io/bound-by-controller": "yes",
                            "volume.beta.kubernetes.io/storage-provisioner": "lab.ferry.dev",
                            "volume.kubernetes.io/storage-provisioner": "lab.ferry.dev",
                            "volume.kubernetes.io/selected-node": "node-1"},
                            "finalizers": ["kubernetes.io/pvc-protection"]},
                        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                                 "volumeMode": "Filesystem", "volumeName": "pvc-123",
                                 "resources": {"requests": {"storage": "1Gi"}}},
                        "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}
                    }),
                    server_meta("data", "uid-pvc"),
                ),
                want: json!({
                    "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "data", "namespace": "shop", "labels": {"app": "shop"},
                                 "finalizers": ["kubernetes.io/pvc-protection"]},
                    "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                             "volumeMode": "Filesystem",
                             "resources": {"requests": {"storage": "1Gi"}}}
                }),
            },
            Case {
                name: "job loses its generated selector and controller-uid labels",
                input: with_meta(
                    json!({
                        "apiVersion": "batch/v1", "kind": "Job", "metadata": {},
                        "spec": {"selector": {"matchLabels": {"batch.kubernetes.io/controller-uid": "uid-job"}},
                                 "template": {"metadata": {"labels": {
                                     "batch.kubernetes.io/controller-uid": "uid-job", "controller-uid": "uid-job",
                                     "batch.kubernetes.io/job-name": "migrate", "job-name": "migrate"}},
                                     "spec": {"restartPolicy": "Never", "containers": [{"name": "m", "image": "busybox"}]}}},
                        "status": {"succeeded": 1}
                    }),
                    server_meta("migrate", "uid-job"),
                ),
                want: json!({
                    "apiVersion": "batch/v1", "kind": "Job",
                    "metadata": {"name": "migrate", "namespace": "shop", "labels": {"app": "shop"}},
                    "spec": {"template": {"metadata": {"labels": {
                                 "batch.kubernetes.io/job-name": "migrate", "job-name": "migrate"}},
                                 "spec": {"restartPolicy": "Never", "containers": [{"name": "m", "image": "busybox"}]}}}
                }),
            },
            Case {
                name: "job with a manual selector keeps it",
                input: json!({
                    "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "m"},
                    "spec": {"manualSelector": true, "selector": {"matchLabels": {"controller-uid": "mine"}},
                             "template": {"metadata": {"labels": {"controller-uid": "mine"}}}}
                }),
                want: json!({
                    "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "m"},
                    "spec": {"manualSelector": true, "selector": {"matchLabels": {"controller-uid": "mine"}},
                             "template": {"metadata": {"labels": {"controller-uid": "mine"}}}}
                }),
            },
            Case {
                name: "bare pod loses its node",
                input: with_meta(
                    json!({
                        "apiVersion": "v1", "kind": "Pod", "metadata": {"deletionTimestamp": "2025-01-02T03:04:05Z",
                                                                    "deletionGracePeriodSeconds": 30},
                        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "busybox"}]},
                        "status": {"phase": "Running", "podIP": "10.0.0.5"}
                    }),
                    server_meta("debug", "uid-pod"),
                ),
                want: json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "debug", "namespace": "shop", "labels": {"app": "shop"}},
                    "spec": {"containers": [{"name": "c", "image": "busybox"}]}
                }),
            },
            Case {
                name: "secret keeps its type and data",
                input: with_meta(
                    json!({
                        "apiVersion": "v1", "kind": "Secret", "metadata": {}, "type": "Opaque",
                        "data": {"password": "aHVudGVyMg=="}
                    }),
                    server_meta("creds", "uid-secret"),
                ),
                want: json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "creds", "namespace": "shop", "labels": {"app": "shop"}},
                    "type": "Opaque", "data": {"password": "aHVudGVyMg=="}
                }),
            },
            Case {
                name: "custom resource loses status only",
                input: with_meta(
                    json!({
                        "apiVersion": "shop.example.com/v1", "kind": "Catalog", "metadata": {},
                        "spec": {"currency": "EUR", "status": "spec field named status stays"},
                        "status": {"items": 12}
                    }),
                    server_meta("main", "uid-cr"),
                ),
                want: json!({
                    "apiVersion": "shop.example.com/v1", "kind": "Catalog",
                    "metadata": {"name": "main", "namespace": "shop", "labels": {"app": "shop"}},
                    "spec": {"currency": "EUR", "status": "spec field named status stays"}
                }),
            },
            Case {
                // Same-named fields on other kinds are not touched.
                name: "volumeName and nodeName outside pvc and pod stay",
                input: json!({
                    "apiVersion": "example.com/v1", "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "x"}, "spec": {"volumeName": "v", "nodeName": "n"}
                }),
                want: json!({
                    "apiVersion": "example.com/v1", "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "x"}, "spec": {"volumeName": "v", "nodeName": "n"}
                }),
            },
        ]
    }

    #[test]
    fn sanitise_table() {
        for case in cases() {
            let got = sanitise(vec![case.input.clone()]);
            assert_eq!(
                got,
                vec![case.want.clone()],
                "case {:?}\n got: {}\nwant: {}",
                case.name,
                serde_json::to_string_pretty(&got[0]).unwrap(),
                serde_json::to_string_pretty(&case.want).unwrap()
            );
        }
    }

    #[test]
    fn owner_references_are_kept_only_for_shipped_owners() {
        let owner = json!({"apiVersion": "shop.example.com/v1", "kind": "Catalog",
                           "metadata": {"name": "main", "uid": "uid-cr"}});
        let owned = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "derived", "uid": "uid-cm", "ownerReferences": [
                {"apiVersion": "shop.example.com/v1", "kind": "Catalog", "name": "main", "uid": "uid-cr", "controller": true},
                {"apiVersion": "v1", "kind": "Namespace", "name": "elsewhere", "uid": "uid-not-shipped"}]}
        });
        let orphan = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "s", "uid": "uid-s", "ownerReferences": [
                {"apiVersion": "v1", "kind": "ServiceAccount", "name": "gone", "uid": "uid-gone"}]}
        });
        let out = sanitise(vec![owner, owned, orphan]);
        assert_eq!(
            out[1]["metadata"]["ownerReferences"],
            json!([{"apiVersion": "shop.example.com/v1", "kind": "Catalog", "name": "main",
                    "uid": "uid-cr", "controller": true}])
        );
        assert_eq!(out[2]["metadata"], json!({"name": "s"}));
        assert!(out.iter().all(|o| o["metadata"].get("uid").is_none()));
    }

    #[test]
    fn sanitise_is_idempotent() {
        let once = sanitise(cases().into_iter().map(|c| c.input).collect());
        assert_eq!(sanitise(once.clone()), once);
    }
}
