//! `manifests::capture` against a real lab site (API server plus node controllers): exactly
//! the app's objects are captured, unlabelled claims the app uses included, and `sanitise`
//! strips what the source assigned.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ferry_lab::node::catalog::Catalog;
use ferry_lab::site::{client_from, SiteRuntime};
use ferry_manifests::{capture, sanitise, ObjectKey};
use ferry_schemas::drpair::DRPair;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::{json, Value};

/// Deadline for each condition the test awaits.
const T: Duration = Duration::from_secs(30);
const NS: &str = "shop";

fn resource(api_version: &str, kind: &str, plural: &str) -> ApiResource {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// Creates `object` (a full object with apiVersion and kind) in `NS` as resource `plural`.
async fn create(client: &Client, plural: &str, object: Value) {
    let ar = resource(
        object["apiVersion"].as_str().unwrap(),
        object["kind"].as_str().unwrap(),
        plural,
    );
    let api: Api<DynamicObject> = if plural == "namespaces" {
        Api::all_with(client.clone(), &ar)
    } else {
        Api::namespaced_with(client.clone(), NS, &ar)
    };
    let name = object["metadata"]["name"].clone();
    let object: DynamicObject = serde_json::from_value(object).unwrap();
    api.create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("creating {plural} {name}: {e}"));
}

async fn install_crd(client: &Client, crd: Value) -> String {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(crd).unwrap();
    let name = crd.name_any();
    crds.create(&PostParams::default(), &crd)
        .await
        .unwrap_or_else(|e| panic!("creating CRD {name}: {e}"));
    tokio::time::timeout(
        T,
        await_condition(crds, &name, conditions::is_crd_established()),
    )
    .await
    .unwrap_or_else(|_| panic!("CRD {name} not established within {T:?}"))
    .unwrap();
    name
}

fn catalog_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "catalogs.shop.example.com"},
        "spec": {
            "group": "shop.example.com", "scope": "Namespaced",
            "names": {"plural": "catalogs", "singular": "catalog", "kind": "Catalog", "listKind": "CatalogList"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                          "subresources": {"status": {}},
                          "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                              "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                              "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}]
        }
    })
}

/// Builds the app in `NS`: what `app=shop` (but not `tier=cache`) must capture, and decoys.
async fn build_app(client: &Client) {
    create(
        client,
        "namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .await;
    install_crd(client, catalog_crd()).await;
    install_crd(client, serde_json::to_value(DRPair::crd()).unwrap()).await;

    let shop = json!({"app": "shop"});
    // The app.
    create(
        client,
        "catalogs",
        json!({
            "apiVersion": "shop.example.com/v1", "kind": "Catalog",
            "metadata": {"name": "main", "labels": shop},
            "spec": {"currency": "EUR"}
        }),
    )
    .await;
    create(client, "persistentvolumeclaims", json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "16Mi"}}}
    }))
    .await;
    create(client, "deployments", json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "labels": shop},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": shop},
            "template": {
                "metadata": {"labels": shop},
                "spec": {
                    // Not in the lab's image catalog: the pod exists but runs nothing.
                    "containers": [{"name": "web", "image": "registry.example.com/shop/web:1.0",
                                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
                }
            }
        }
    }))
    .await;
    create(
        client,
        "configmaps",
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "settings", "labels": shop, "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{\"data\":{}}",
                "team": "payments"}},
            "data": {"LOG_LEVEL": "info"}
        }),
    )
    .await;
    create(
        client,
        "secrets",
        json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "creds", "labels": shop},
            "data": {"password": "aHVudGVyMg=="}
        }),
    )
    .await;
    create(
        client,
        "services",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "labels": shop},
            "spec": {"type": "NodePort", "selector": shop,
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}
        }),
    )
    .await;
    create(
        client,
        "services",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web-headless", "labels": shop},
            "spec": {"clusterIP": "None", "selector": shop, "ports": [{"port": 80}]}
        }),
    )
    .await;

    // Decoys: labelled objects Ferry must not ship, and objects the selector excludes.
    create(
        client,
        "configmaps",
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "unrelated"}, "data": {"k": "v"}
        }),
    )
    .await;
    create(
        client,
        "configmaps",
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cache-tuning", "labels": {"app": "shop", "tier": "cache"}},
            "data": {"k": "v"}
        }),
    )
    .await;
    create(
        client,
        "secrets",
        json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
            "metadata": {"name": "web-token", "labels": shop,
                         "annotations": {"kubernetes.io/service-account.name": "default"}}
        }),
    )
    .await;
    create(
        client,
        "leases",
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "shop-leader", "labels": shop},
            "spec": {"holderIdentity": "web-0"}
        }),
    )
    .await;
    create(client, "events", json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": "web.1", "labels": shop},
        "involvedObject": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "namespace": NS},
        "reason": "Tested", "message": "a labelled event", "type": "Normal"
    }))
    .await;
    create(client, "drpairs", json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "DRPair",
        "metadata": {"name": "shop", "labels": shop},
        "spec": {"selector": {"matchLabels": shop}, "primarySite": "a", "secondarySite": "b", "rpo": "1m"}
    }))
    .await;
}

/// Awaits the Deployment's pod (owned by it, labelled `app=shop`) and the claim's binding, so
/// the capture below really has a controller-owned pod to skip and binding fields to strip.
async fn await_pod_and_binding(client: &Client) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut owned_pods = watcher(pods, watcher::Config::default().labels("app=shop"))
        .applied_objects()
        .try_filter(|pod| {
            let owned = pod
                .owner_references()
                .iter()
                .any(|o| o.kind == "Deployment" && o.controller == Some(true));
            futures::future::ready(owned)
        })
        .boxed();
    tokio::time::timeout(T, owned_pods.try_next())
        .await
        .unwrap_or_else(|_| panic!("no pod owned by Deployment web within {T:?}"))
        .unwrap()
        .expect("pod watch ended");

    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    let bound = |c: Option<&PersistentVolumeClaim>| {
        c.and_then(|c| c.spec.as_ref()?.volume_name.as_ref())
            .is_some()
    };
    let result = tokio::time::timeout(T, await_condition(pvcs.clone(), "data", bound)).await;
    if result.is_err() {
        let last = pvcs.get("data").await.map(|c| format!("{:?}", c.status));
        panic!("claim data not bound within {T:?}; last status: {last:?}");
    }
}

fn keys(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| ObjectKey::of(o).to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_exactly_the_app_and_sanitises_it() {
    let dir = tempfile::tempdir().unwrap();
    // No image of this app is in the catalog, so the binary is never run.
    let catalog = Catalog::with_exe(PathBuf::from("/nonexistent/ferry-lab"));
    let site = SiteRuntime::start_with_catalog(
        "manifests",
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        catalog,
    )
    .await
    .expect("lab site starts");
    let client = client_from(&dir.path().join("kubeconfig"))
        .await
        .expect("client");

    build_app(&client).await;
    await_pod_and_binding(&client).await;

    let selector = LabelSelector {
        match_labels: Some(BTreeMap::from([("app".to_string(), "shop".to_string())])),
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "tier".into(),
            operator: "NotIn".into(),
            values: Some(vec!["cache".into()]),
        }]),
    };
    let captured = capture(&client, NS, &selector).await.expect("capture");

    let got = keys(&captured.objects);
    assert_eq!(
        got,
        [
            "ConfigMap shop/settings",
            "PersistentVolumeClaim shop/data",
            "Secret shop/creds",
            "Service shop/web",
            "Service shop/web-headless",
            "Deployment.apps shop/web",
            "Catalog.shop.example.com shop/main",
        ]
        .map(String::from)
        .to_vec(),
        "captured objects (sorted by group, kind, name):\n{}",
        serde_json::to_string_pretty(&captured.objects).unwrap()
    );
    assert_eq!(captured.pvcs, ["data"]);

    // What the source assigned is really there before sanitising...
    let find = |objects: &[Value], key: &str| {
        objects
            .iter()
            .find(|o| ObjectKey::of(o).to_string() == key)
            .cloned()
            .unwrap_or_else(|| panic!("{key} missing"))
    };
    let claim = find(&captured.objects, "PersistentVolumeClaim shop/data");
    assert!(claim["spec"]["volumeName"].is_string(), "{claim:#}");
    assert!(
        claim["metadata"]["annotations"]["pv.kubernetes.io/bind-completed"].is_string(),
        "{claim:#}"
    );
    let service = find(&captured.objects, "Service shop/web");
    assert!(service["spec"]["clusterIP"].is_string(), "{service:#}");
    for object in &captured.objects {
        assert!(object["metadata"]["uid"].is_string(), "{object:#}");
        assert!(
            object["metadata"]["resourceVersion"].is_string(),
            "{object:#}"
        );
    }

    // ...and gone after.
    let clean = sanitise(captured.objects.clone());
    assert_eq!(keys(&clean), got, "sanitise keeps the set and its order");
    for object in &clean {
        let meta = object["metadata"].as_object().unwrap();
        for field in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "managedFields",
            "generation",
            "selfLink",
        ] {
            assert!(!meta.contains_key(field), "{field} left in {object:#}");
        }
        assert!(object.get("status").is_none(), "status left in {object:#}");
        assert_eq!(object["metadata"]["namespace"], NS);
    }
    let claim = find(&clean, "PersistentVolumeClaim shop/data");
    assert!(claim["spec"].get("volumeName").is_none(), "{claim:#}");
    assert!(
        claim["metadata"]["annotations"]
            .get("pv.kubernetes.io/bind-completed")
            .is_none(),
        "{claim:#}"
    );
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "16Mi");
    let service = find(&clean, "Service shop/web");
    assert!(service["spec"].get("clusterIP").is_none(), "{service:#}");
    assert!(service["spec"].get("clusterIPs").is_none(), "{service:#}");
    let port = &service["spec"]["ports"][0];
    assert_eq!(
        (&port["name"], &port["port"], &port["targetPort"]),
        (&json!("http"), &json!(80), &json!(8080)),
        "{service:#}"
    );
    assert!(port.get("nodePort").is_none(), "{service:#}");
    assert_eq!(service["spec"]["type"], "NodePort");
    let headless = find(&clean, "Service shop/web-headless");
    assert_eq!(headless["spec"]["clusterIP"], "None", "{headless:#}");
    let settings = find(&clean, "ConfigMap shop/settings");
    assert_eq!(
        settings["metadata"]["annotations"],
        json!({"team": "payments"}),
        "{settings:#}"
    );
    assert_eq!(settings["data"], json!({"LOG_LEVEL": "info"}));
    let catalog = find(&clean, "Catalog.shop.example.com shop/main");
    assert_eq!(catalog["spec"], json!({"currency": "EUR"}));

    site.shutdown().await;
}
