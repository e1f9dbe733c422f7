//! kube-rs conformance suite for the lab's API server.
//!
//! Runs against an in-process lab site by default, or against any cluster whose kubeconfig
//! is named by `FERRY_CONFORMANCE_KUBECONFIG`, so the lab's behaviour can be checked against
//! a real apiserver with the same assertions. `the_suite_on_a_real_control_plane` runs every
//! scenario in turn on one lab site of the real control plane (the kit in
//! `FERRY_LAB_KUBE_BIN`; listed as ignored without it, failing under `CI=true`), restarts
//! included.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, unique_ns, Site};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::core::Status;
use kube::discovery::{Discovery, Scope};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::{conditions, wait::await_condition, watcher, WatchStreamExt};
use kube::{Client, CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

async fn namespace(client: &Client, prefix: &str) -> String {
    let name = unique_ns(prefix);
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
    name
}

fn api_error(e: kube::Error) -> Box<Status> {
    match e {
        kube::Error::Api(status) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn typed_crud_of_namespace_configmap_and_deployment() {
    typed_crud(&mut Site::start().await).await
}

async fn typed_crud(site: &mut Site) {
    let client = site.client().await;
    let ns = namespace(&client, "crud").await;

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "settings", "labels": {"app": "web"}}, "data": {"k": "v1"}}),
    )
    .unwrap();
    let created = cms.create(&PostParams::default(), &cm).await.unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
    let mut got = cms.get("settings").await.unwrap();
    assert_eq!(got.data.as_ref().unwrap()["k"], "v1");
    got.data = Some(BTreeMap::from([("k".to_string(), "v2".to_string())]));
    let replaced = cms
        .replace("settings", &PostParams::default(), &got)
        .await
        .unwrap();
    assert_ne!(
        replaced.metadata.resource_version,
        created.metadata.resource_version
    );
    let listed = cms
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    // `!=` also selects objects without the label, such as the `kube-root-ca.crt` a cluster
    // publishes into every namespace.
    let others: Vec<String> = cms
        .list(&ListParams::default().labels("app!=web"))
        .await
        .unwrap()
        .items
        .iter()
        .map(|cm| cm.name_any())
        .collect();
    assert!(!others.contains(&"settings".to_string()), "{others:?}");

    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "nginx", "env": [{"name": "A", "value": "1"}]}]}}}
    }))
    .unwrap();
    let d = deploys.create(&PostParams::default(), &d).await.unwrap();
    assert_eq!(d.metadata.generation, Some(1));
    // A strategic merge patch merges containers and env by name.
    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "web", "env": [{"name": "B", "value": "2"}]}]}}}});
    let d = deploys
        .patch("web", &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap();
    let env = d
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .env
        .clone()
        .unwrap();
    // A new element goes before the old ones that are not in the patch, as the API server
    // orders a strategic merge.
    assert_eq!(
        env.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["B", "A"]
    );
    assert_eq!(
        d.metadata.generation,
        Some(2),
        "a spec change bumps generation"
    );
    // A status write does not touch spec or generation.
    let d = deploys
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 2, "readyReplicas": 2}})),
        )
        .await
        .unwrap();
    assert_eq!(d.metadata.generation, Some(2));
    assert_eq!(d.status.unwrap().ready_replicas, Some(2));
    let scale = deploys.get_scale("web").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    deploys
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    assert_eq!(
        deploys.get("web").await.unwrap().spec.unwrap().replicas,
        Some(5)
    );

    deploys
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    let e = api_error(deploys.get("web").await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"));

    // Deleting the namespace deletes its contents.
    Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
    eventually("namespace gone", T, || async {
        match Api::<Namespace>::all(client.clone())
            .get_opt(&ns)
            .await
            .unwrap()
        {
            None => Ok(()),
            Some(n) => Err(format!("{:?}", n.status)),
        }
    })
    .await;
    assert!(cms.get_opt("settings").await.unwrap().is_none());
}

#[tokio::test]
async fn dynamic_objects_over_every_discovered_namespaced_resource() {
    dynamic_objects(&mut Site::start().await).await
}

async fn dynamic_objects(site: &mut Site) {
    let client = site.client().await;
    let ns = namespace(&client, "dyn").await;
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let mut seen = Vec::new();
    for group in discovery.groups() {
        for (ar, caps) in group.recommended_resources() {
            if caps.scope != Scope::Namespaced
                || !caps.supports_operation(kube::discovery::verbs::LIST)
            {
                continue;
            }
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
            let list = api
                .list(&ListParams::default())
                .await
                .unwrap_or_else(|e| panic!("listing {}: {e}", ar.plural));
            // A cluster publishes its CA bundle and a `default` ServiceAccount into every
            // namespace (the lab's own API server does not); nothing else is there.
            let published: &[&str] = match ar.plural.as_str() {
                "configmaps" => &["kube-root-ca.crt", "openshift-service-ca.crt"],
                "serviceaccounts" => &["default"],
                _ => &[],
            };
            let names: Vec<String> = list.items.iter().map(|o| o.name_any()).collect();
            assert!(
                names.iter().all(|n| published.contains(&n.as_str())),
                "{} holds only what the cluster publishes in a new namespace: {names:?}",
                ar.plural
            );
            seen.push(ar.plural.clone());
        }
    }
    for expected in [
        "configmaps",
        "secrets",
        "pods",
        "persistentvolumeclaims",
        "deployments",
        "statefulsets",
        "jobs",
        "cronjobs",
        "leases",
        "volumesnapshots",
    ] {
        assert!(
            seen.iter().any(|s| s == expected),
            "{expected} discovered; saw {seen:?}"
        );
    }
    // Create, get and delete one object of a kind through the dynamic API.
    let (ar, _) = discovery
        .resolve_gvk(&kube::api::GroupVersionKind::gvk("", "v1", "ConfigMap"))
        .unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
    let obj: DynamicObject = serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dyn"}, "data": {"x": "1"}})).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
    assert_eq!(api.get("dyn").await.unwrap().data["data"]["x"], "1");
}

#[tokio::test]
async fn watcher_survives_a_lab_restart() {
    watcher_survives_a_restart(&mut Site::start().await).await
}

async fn watcher_survives_a_restart(site: &mut Site) {
    if !site.can_restart() {
        eprintln!("skipped: restarting needs a lab site");
        return;
    }
    let client = site.client().await;
    let ns = namespace(&client, "watch").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let mut stream = watcher(cms.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let create = |name: &'static str| {
        let cms = cms.clone();
        async move {
            let cm: ConfigMap =
                serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
            cms.create(&PostParams::default(), &cm).await.unwrap();
        }
    };
    create("before").await;
    let first = tokio::time::timeout(T, stream.try_next())
        .await
        .expect("event before restart")
        .unwrap()
        .unwrap();
    assert_eq!(first.name_any(), "before");

    site.restart().await;
    // The watch connection broke; the watcher reconnects (relisting on 410) and sees new objects.
    create("after").await;
    let seen = tokio::time::timeout(T, async {
        loop {
            match stream.try_next().await {
                Ok(Some(cm)) if cm.name_any() == "after" => return cm,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("watcher stream ended"),
                // Errors while the server is down are reported and retried by the backoff-less
                // watcher; keep polling.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("watcher sees an object created after the restart");
    assert_eq!(seen.name_any(), "after");
    assert!(
        cms.get_opt("before").await.unwrap().is_some(),
        "objects survive the restart"
    );
}

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "conformance.ferry.dev",
    version = "v1",
    kind = "Widget",
    namespaced,
    status = "WidgetStatus"
)]
struct WidgetSpec {
    size: i32,
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    every: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
struct WidgetStatus {
    observed_size: i32,
    ready: bool,
}

const FINALIZER: &str = "conformance.ferry.dev/cleanup";

async fn install_widget_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = Widget::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("conformance").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("CRD applied");
    tokio::time::timeout(
        T,
        await_condition(crds, &crd.name_any(), conditions::is_crd_established()),
    )
    .await
    .expect("CRD established in time")
    .unwrap();
}

#[tokio::test]
async fn controller_reconciles_a_crd_with_a_finalizer_and_apply_status() {
    controller_with_finalizer(&mut Site::start().await).await
}

async fn controller_with_finalizer(site: &mut Site) {
    let client = site.client().await;
    install_widget_crd(&client).await;
    let ns = namespace(&client, "ctrl").await;
    let widgets: Api<Widget> = Api::namespaced(client.clone(), &ns);
    let cleaned = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    struct Ctx {
        client: Client,
        cleaned: Arc<std::sync::atomic::AtomicUsize>,
    }
    async fn reconcile(
        w: Arc<Widget>,
        ctx: Arc<Ctx>,
    ) -> Result<Action, kube::runtime::finalizer::Error<kube::Error>> {
        let api: Api<Widget> = Api::namespaced(ctx.client.clone(), &w.namespace().unwrap());
        finalizer(&api, FINALIZER, w, |event| async {
            match event {
                Finalizer::Apply(w) => {
                    let status = json!({"apiVersion": "conformance.ferry.dev/v1", "kind": "Widget", "status": {"observed_size": w.spec.size, "ready": true}});
                    api.patch_status(&w.name_any(), &PatchParams::apply("widget-controller").force(), &Patch::Apply(&status)).await?;
                    Ok(Action::await_change())
                }
                Finalizer::Cleanup(_) => {
                    ctx.cleaned.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Ok(Action::await_change())
                }
            }
        })
        .await
    }
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        cleaned: cleaned.clone(),
    });
    let controller = tokio::spawn(
        Controller::new(widgets.clone(), watcher::Config::default())
            .run(
                reconcile,
                |_, _, _| Action::requeue(Duration::from_millis(200)),
                ctx,
            )
            .for_each(|_| async {}),
    );

    let w = Widget::new(
        "w1",
        WidgetSpec {
            size: 3,
            every: "30s".into(),
        },
    );
    widgets.create(&PostParams::default(), &w).await.unwrap();
    let w = eventually("widget reconciled", T, || async {
        let w = widgets.get("w1").await.map_err(|e| e.to_string())?;
        match &w.status {
            Some(s)
                if s.ready
                    && s.observed_size == 3
                    && w.finalizers().contains(&FINALIZER.to_string()) =>
            {
                Ok(w)
            }
            _ => Err(format!(
                "status {:?}, finalizers {:?}",
                w.status,
                w.finalizers()
            )),
        }
    })
    .await;
    let managers: Vec<_> = w
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.contains(&"widget-controller".to_string()),
        "apply recorded its manager: {managers:?}"
    );

    widgets
        .delete("w1", &DeleteParams::default())
        .await
        .unwrap();
    eventually("widget finalized and gone", T, || async {
        match widgets.get_opt("w1").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(w) => Err(format!(
                "still there: deletionTimestamp {:?}, finalizers {:?}",
                w.metadata.deletion_timestamp,
                w.finalizers()
            )),
        }
    })
    .await;
    assert_eq!(
        cleaned.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "cleanup ran once"
    );
    controller.abort();
}

#[tokio::test]
async fn errors_409_410_and_422_name_their_cause() {
    errors_name_their_cause(&mut Site::start_with_window(16).await).await
}

async fn errors_name_their_cause(site: &mut Site) {
    let client = site.client().await;
    install_widget_crd(&client).await;
    let ns = namespace(&client, "errs").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    // 409 AlreadyExists.
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "c"}})).unwrap();
    let first = cms.create(&PostParams::default(), &cm).await.unwrap();
    let e = api_error(cms.create(&PostParams::default(), &cm).await.unwrap_err());
    assert_eq!(
        (e.code, e.reason.as_str()),
        (409, "AlreadyExists"),
        "{}",
        e.message
    );
    // 409 Conflict on a stale resourceVersion. The first replace must change something: an
    // identical write is a no-op that keeps the resourceVersion, as on a real apiserver.
    let mut changed = first.clone();
    changed.data = Some([("k".to_string(), "v".to_string())].into());
    cms.replace("c", &PostParams::default(), &changed)
        .await
        .unwrap();
    let e = api_error(
        cms.replace("c", &PostParams::default(), &first)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.reason.as_str()),
        (409, "Conflict"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("the object has been modified"),
        "{}",
        e.message
    );

    // 410 Gone once the resourceVersion has left the window. A real API server keeps serving
    // old revisions from etcd until it compacts them (every 5 minutes), so a test cannot force
    // it there in reasonable time; the watcher test covers resuming after a restart instead.
    if site.is_kubernetes() {
        eprintln!(
            "410: not forced on the real control plane (etcd keeps history until compaction)"
        );
    } else {
        let old_rv = cms.get("c").await.unwrap().resource_version().unwrap();
        for i in 0..(site.watch_window + 4) {
            let cm: ConfigMap =
                serde_json::from_value(json!({"metadata": {"name": format!("fill-{i}")}})).unwrap();
            cms.create(&PostParams::default(), &cm).await.unwrap();
        }
        let mut stream = cms
            .watch(&WatchParams::default(), &old_rv)
            .await
            .unwrap()
            .boxed();
        match tokio::time::timeout(T, stream.try_next())
            .await
            .expect("watch answers")
            .unwrap()
        {
            Some(WatchEvent::Error(e)) => {
                assert_eq!(
                    (e.code, e.reason.as_str()),
                    (410, "Expired"),
                    "{}",
                    e.message
                );
            }
            other => panic!("expected a 410 ERROR event, got {other:?}"),
        }
    }

    // 422 Invalid naming the field path.
    let widgets: Api<Widget> = Api::namespaced(client.clone(), &ns);
    let bad = Widget::new(
        "bad",
        WidgetSpec {
            size: 1,
            every: "5 minutes".into(),
        },
    );
    let e = api_error(
        widgets
            .create(&PostParams::default(), &bad)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.reason.as_str()),
        (422, "Invalid"),
        "{}",
        e.message
    );
    assert!(
        e.message
            .contains("spec.every: Invalid value: \"5 minutes\""),
        "{}",
        e.message
    );
    let untyped: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &kube::discovery::ApiResource::erase::<Widget>(&()),
    );
    let wrong: DynamicObject = serde_json::from_value(json!({"apiVersion": "conformance.ferry.dev/v1", "kind": "Widget", "metadata": {"name": "wrong"}, "spec": {"size": "big"}})).unwrap();
    let e = api_error(
        untyped
            .create(&PostParams::default(), &wrong)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    assert!(e.message.contains("spec.size"), "{}", e.message);
    assert!(
        e.message.contains("spec.every: Required value"),
        "{}",
        e.message
    );
}

/// Every scenario above, in turn, on one lab site running the real control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    lab_no_kube_kit,
    ignore = "the Kubernetes control-plane kit is missing (FERRY_LAB_KUBE_BIN and etcd; .ci/run provides both)"
)]
async fn the_suite_on_a_real_control_plane() {
    let mut site = Site::start_kubernetes("the_suite_on_a_real_control_plane").await;
    typed_crud(&mut site).await;
    dynamic_objects(&mut site).await;
    controller_with_finalizer(&mut site).await;
    errors_name_their_cause(&mut site).await;
    watcher_survives_a_restart(&mut site).await;
}
