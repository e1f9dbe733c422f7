//! Issue 3 end to end on two lab sites with Ferry deployed from deploy/: a pair over a
//! Deployment with a Filesystem PVC and a Block PVC, a ConfigMap, a Secret, a Service and a
//! custom resource replicates; the destination's generation restores to exactly the source's
//! bytes; the stored manifests are sanitised and transform as the pair says; invalid DRPairs
//! are refused naming the field while the replicator keeps serving the valid pair.

mod e2e;

use std::path::PathBuf;
use std::time::Duration;

use ferry_lab::node::storage::bound_volume;
use ferry_lab::site::client_from;
use ferry_lab::testing::{checksum, eventually, Lab};
use ferry_schemas::DRPair;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
const NS: &str = "web";

async fn create(client: &Client, object: Value) {
    e2e::create_object(client, NS, object).await
}

async fn volume_path(client: &Client, claim: &str) -> PathBuf {
    eventually(&format!("PVC {claim} bound"), T, || async {
        bound_volume(client, NS, claim)
            .await
            .map_err(|e| e.to_string())?
            .map(|v| v.path)
            .ok_or_else(|| "not bound".to_string())
    })
    .await
}

async fn pair_generation(pairs: &Api<DRPair>, name: &str) -> Result<u64, String> {
    let p = pairs.get(name).await.map_err(|e| e.to_string())?;
    let s = p.status.unwrap_or_default();
    s.generation
        .map(|g| g.0)
        .ok_or_else(|| format!("phase {:?}, conditions {:?}", s.phase, s.conditions))
}

on_both_planes!(
    an_app_replicates_exactly_and_bad_pairs_are_refused,
    an_app_replicates_exactly_and_bad_pairs_are_refused_on_kubernetes,
    an_app_replicates_exactly_and_bad_pairs_are_refused_on
);

async fn an_app_replicates_exactly_and_bad_pairs_are_refused_on(settings: e2e::LabSettings) {
    let dir = tempfile::tempdir().unwrap();
    // FERRY_TEST_LAB_DIR keeps the lab's files (logs, timelines) for a post-mortem.
    let lab = Lab(std::env::var_os("FERRY_TEST_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("lab")));
    e2e::up(&lab.0, "a,b", &[], &settings);
    let a = client_from(&lab.0.join("a/kubeconfig")).await.unwrap();
    let b = client_from(&lab.0.join("b/kubeconfig")).await.unwrap();

    // The app at a.
    create(
        &a,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .await;
    // The app's CRD is installed at both sites, as its operator would be.
    for site in [&a, &b] {
        create(site, json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "widgets.test.dev"}, "spec": {
            "group": "test.dev", "scope": "Namespaced", "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}]}})).await;
        eventually("the Widget CRD served", T, || async {
            kube::discovery::pinned_kind(site, &GroupVersionKind::gvk("test.dev", "v1", "Widget"))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await;
    }
    let labels = json!({"app": "web", "site": "a"});
    // Ferry may write the app's own kinds at the DR site once the admin aggregates them into
    // its role (deploy/README.md); enforced on the real control plane.
    for site in [&a, &b] {
        create(site, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "ferry-widgets", "labels": {"ferry.dev/aggregate-to-ferry": "true"}},
            "rules": [{"apiGroups": ["test.dev"], "resources": ["widgets"], "verbs": ["create", "update", "patch"]}]})).await;
    }
    create(&a, json!({"apiVersion": "test.dev/v1", "kind": "Widget", "metadata": {"name": "w1", "labels": labels}, "spec": {"size": 3}})).await;
    create(&a, json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "labels": labels}, "data": {"k": "v"}})).await;
    create(&a, json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "unrelated"}, "data": {"k": "v"}})).await;
    create(&a, json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "labels": labels}, "stringData": {"password": "hunter2"}})).await;
    create(&a, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "labels": labels}, "spec": {"clusterIP": "10.96.0.12", "selector": {"app": "web"}, "ports": [{"port": 80}]}})).await;
    create(&a, json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "files"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}}})).await;
    create(&a, json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "disk"}, "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block", "resources": {"requests": {"storage": "16Mi"}}}})).await;
    create(&a, json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": labels}, "spec": {
        "replicas": 2, "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": labels}, "spec": {
            "containers": [{"name": "idle", "image": "busybox", "command": ["sleep", "3600"],
                "volumeMounts": [{"name": "files", "mountPath": "/data"}],
                "volumeDevices": [{"name": "disk", "devicePath": "/dev/disk0"}]}],
            "volumes": [{"name": "files", "persistentVolumeClaim": {"claimName": "files"}}, {"name": "disk", "persistentVolumeClaim": {"claimName": "disk"}}]}}}})).await;

    // Data in both volumes, written while nothing else writes (the app idles).
    let files = volume_path(&a, "files").await;
    let disk = volume_path(&a, "disk").await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    std::fs::create_dir_all(files.join("db/logs")).unwrap();
    for i in 0..50 {
        let mut data = vec![0u8; rng.random_range(1..32 * 1024)];
        rng.fill(&mut data[..]);
        std::fs::write(files.join(format!("db/logs/{i}.log")), data).unwrap();
    }
    std::os::unix::fs::symlink("db/logs/1.log", files.join("current")).unwrap();
    let mut image = vec![0u8; 8 << 20];
    rng.fill(&mut image[..]);
    let mut file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::io::Write::write_all(&mut file, &image).unwrap();
    drop(file);
    let (files_sum, disk_sum) = (checksum(&files), checksum(&disk));

    // The pair.
    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NS);
    create(&a, json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRPair", "metadata": {"name": "web"}, "spec": {
        "selector": {"matchLabels": {"app": "web"}}, "primarySite": "a", "secondarySite": "b", "rpo": "30s",
        "transform": {"labels": {"set": {"site": "b"}}, "replicas": {"policy": "Fixed", "count": 1}}}})).await;
    let generation = eventually("the first generation", T, || pair_generation(&pairs, "web")).await;

    // The destination's generation, restored into fresh PVCs at b, equals the source's bytes.
    for (claim, mode, sum) in [
        ("files", "Filesystem", &files_sum),
        ("disk", "Block", &disk_sum),
    ] {
        let name = format!("check-{claim}");
        create(&b, json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": {
            "accessModes": ["ReadWriteOnce"], "volumeMode": mode, "resources": {"requests": {"storage": if claim == "disk" { "16Mi" } else { "64Mi" }}},
            "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": format!("ferry-web-{claim}-g{generation}")}}})).await;
        let restored = volume_path(&b, &name).await;
        assert_eq!(
            &checksum(&restored),
            sum,
            "volume {claim} of generation {generation} at b equals the source"
        );
    }

    // The manifests: exactly the app, sanitised.
    let secret = Api::<Secret>::namespaced(b.clone(), NS)
        .get(&format!("ferry-web-g{generation}-manifests"))
        .await
        .unwrap();
    let bundle: Value = serde_json::from_slice(&secret.data.unwrap()["manifests.json"].0).unwrap();
    let objects = bundle["objects"].as_array().unwrap();
    let mut kinds: Vec<String> = objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ConfigMap/cfg",
            "Deployment/web",
            "PersistentVolumeClaim/disk",
            "PersistentVolumeClaim/files",
            "Secret/creds",
            "Service/web",
            "Widget/w1"
        ]
    );
    for o in objects {
        for field in [
            "uid",
            "resourceVersion",
            "managedFields",
            "creationTimestamp",
        ] {
            assert!(
                o["metadata"].get(field).is_none(),
                "{field} dropped from {o}"
            );
        }
        assert!(o.get("status").is_none(), "status dropped from {o}");
    }
    let service = objects.iter().find(|o| o["kind"] == "Service").unwrap();
    assert!(service["spec"].get("clusterIP").is_none(), "{service}");
    let pvc = objects
        .iter()
        .find(|o| o["kind"] == "PersistentVolumeClaim")
        .unwrap();
    assert!(pvc["spec"].get("volumeName").is_none(), "{pvc}");
    // …and transform as the pair says when instantiated.
    let pair = pairs.get("web").await.unwrap();
    let waves = ferry_failover::instantiate::plan(&b, &pair, NS, generation)
        .await
        .unwrap();
    let deployment = waves
        .iter()
        .flatten()
        .find(|o| o["kind"] == "Deployment")
        .unwrap();
    assert_eq!(deployment["metadata"]["labels"]["site"], "b");
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["site"],
        "b"
    );
    assert_eq!(deployment["spec"]["replicas"], 1);
    let claim = waves
        .iter()
        .flatten()
        .find(|o| o["kind"] == "PersistentVolumeClaim" && o["metadata"]["name"] == "files")
        .unwrap();
    assert_eq!(
        claim["spec"]["dataSource"]["name"],
        format!("ferry-web-files-g{generation}")
    );

    // Bad input: the schema refuses a bad rpo, naming the field…
    let bad: DRPair = serde_json::from_value(json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRPair", "metadata": {"name": "bad-rpo"}, "spec": {
        "selector": {"matchLabels": {"app": "x"}}, "primarySite": "a", "secondarySite": "b", "rpo": "soon"}})).unwrap();
    match pairs.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422);
            assert!(e.message.contains("spec.rpo"), "{}", e.message);
        }
        other => panic!("a bad rpo must be refused: {other:?}"),
    }
    // …and the controller marks an unknown site and an empty selector with conditions naming them.
    for (name, spec, field) in [
        (
            "unknown-site",
            json!({"selector": {"matchLabels": {"app": "x"}}, "primarySite": "a", "secondarySite": "mars", "rpo": "30s"}),
            "spec.secondarySite",
        ),
        (
            "empty-selector",
            json!({"selector": {}, "primarySite": "a", "secondarySite": "b", "rpo": "30s"}),
            "spec.selector",
        ),
    ] {
        let object: DRPair = serde_json::from_value(json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRPair", "metadata": {"name": name}, "spec": spec})).unwrap();
        match pairs.create(&PostParams::default(), &object).await {
            Err(kube::Error::Api(e)) => assert!(e.message.contains(field), "{}", e.message),
            Err(e) => panic!("{e}"),
            Ok(_) => {
                let message = eventually(&format!("{name} marked invalid"), T, || async {
                    let p = pairs.get(name).await.map_err(|e| e.to_string())?;
                    let ready = p
                        .status
                        .unwrap_or_default()
                        .conditions
                        .into_iter()
                        .find(|c| c.type_ == "Ready");
                    match ready {
                        Some(c) if c.reason == "InvalidSpec" => Ok(c.message),
                        other => Err(format!("{other:?}")),
                    }
                })
                .await;
                assert!(message.contains(field), "{message}");
            }
        }
    }
    // The valid pair keeps replicating: a requested sync commits a newer generation.
    pairs
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"ferry.dev/sync-request": "after-bad-input"}}}),
            ),
        )
        .await
        .unwrap();
    let next = eventually("a generation after the bad input", T, || async {
        let p = pairs.get("web").await.map_err(|e| e.to_string())?;
        let s = p.status.unwrap_or_default();
        match (s.last_sync_request.as_deref(), s.generation) {
            (Some("after-bad-input"), Some(g)) => Ok(g.0),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(next > generation);
    // The DR site's copy of the pair agrees with the source's.
    let copy = Api::<DRPair>::namespaced(b.clone(), NS)
        .get("web")
        .await
        .unwrap();
    assert_eq!(copy.spec, pair.spec);

    // A sender on a stale epoch (a fenced old primary) is refused by b's replicator with a
    // clear error, and b records an Event on its DRPair.
    let tls = ferry_replicator::tls::TlsMaterial::from_dir(lab.0.join("a/tls")).unwrap();
    let b_ip = ferry_lab::sites::SiteLayout::in_lab(&lab.0, "b")
        .read_record()
        .unwrap()
        .listen
        .ip();
    let mut peer =
        ferry_replicator::transport::connect_peer(&format!("{b_ip}:7443"), &tls).unwrap();
    let header = ferry_schemas::proto::SyncHeader::new(NS, "web", next + 1, 0, "a");
    let refused = peer
        .begin(ferry_schemas::proto::replication::BeginRequest {
            header: Some(header),
            volumes: vec![],
            pair_json: vec![],
            resume_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("stale epoch 0"),
        "{}",
        refused.message()
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(b.clone(), NS);
    let note = eventually("a StaleEpoch Event at b", T, || async {
        let list = events
            .list(&Default::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("StaleEpoch")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web")
            })
            .and_then(|e| e.note)
            .ok_or_else(|| "none yet".to_string())
    })
    .await;
    assert!(note.contains("stale epoch 0"), "{note}");

    // standby: Applied parks the app at b: objects applied, workloads at zero replicas with
    // the count to restore in an annotation.
    pairs
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"annotations": {"ferry.dev/sync-request": "standby"}},
                "spec": {"standby": "Applied"},
            })),
        )
        .await
        .unwrap();
    let parked = eventually("the app parked at b", T, || async {
        let d = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(b.clone(), NS)
            .get_opt("web")
            .await
            .map_err(|e| e.to_string())?;
        d.ok_or_else(|| "no Deployment yet".to_string())
    })
    .await;
    assert_eq!(parked.spec.as_ref().unwrap().replicas, Some(0));
    assert_eq!(
        parked.metadata.annotations.as_ref().unwrap()["ferry.dev/original-replicas"],
        "1"
    );
    assert_eq!(parked.metadata.labels.as_ref().unwrap()["site"], "b");
    assert!(
        Api::<k8s_openapi::api::core::v1::Service>::namespaced(b.clone(), NS)
            .get_opt("web")
            .await
            .unwrap()
            .is_some()
    );
    let widget = ApiResource::from_gvk(&GroupVersionKind::gvk("test.dev", "v1", "Widget"));
    assert!(
        Api::<DynamicObject>::namespaced_with(b.clone(), NS, &widget)
            .get_opt("w1")
            .await
            .unwrap()
            .is_some()
    );
}
