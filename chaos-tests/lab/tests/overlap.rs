//! Two pairs cannot protect the same app: a second DRPair whose selector takes in the ledger
//! app already protected by `ledger` does not replicate. It reports `Ready=False`
//! (`OverlapsPair`) naming the first pair and the shared objects, with an Event, and never
//! gets a generation; the first pair keeps replicating.

mod e2e;

use e2e::{eventually, setup_on, sync_now, Lab, NS};
use ferry_schemas::DRPair;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};

on_both_planes!(
    a_pair_overlapping_an_earlier_one_is_refused_and_the_first_keeps_running,
    a_pair_overlapping_an_earlier_one_is_refused_and_the_first_keeps_running_on_kubernetes,
    overlapping_pair_on
);

async fn overlapping_pair_on(settings: e2e::LabSettings) {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, _b) = setup_on(&lab.0, &settings).await;
    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NS);
    let first = pairs.get("ledger").await.unwrap();
    let twin = DRPair::new("ledger-twin", first.spec.clone());
    pairs.create(&PostParams::default(), &twin).await.unwrap();

    let message = eventually("Ready=False OverlapsPair on the second pair", || async {
        let p = pairs.get("ledger-twin").await.map_err(|e| e.to_string())?;
        let s = p.status.unwrap_or_default();
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").cloned();
        match ready {
            Some(c) if c.status == "False" && c.reason == "OverlapsPair" => Ok(c.message),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    println!("Ready=False: {message}");
    assert!(message.contains("DRPair ledger "), "{message}");
    assert!(
        message.contains("Deployment.apps shop/ledger")
            && message.contains("PersistentVolumeClaim shop/"),
        "{message}"
    );
    // The first pair keeps replicating; the second never gets a generation.
    sync_now(&a, "after-the-twin").await;
    let twin = pairs.get("ledger-twin").await.unwrap();
    assert_eq!(twin.status.and_then(|s| s.generation), None);
    let events: Api<Event> = Api::namespaced(a.clone(), NS);
    let said = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .any(|e| {
            e.reason.as_deref() == Some("OverlapsPair")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("ledger-twin")
                && e.note
                    .as_deref()
                    .is_some_and(|m| m.contains("DRPair ledger "))
        });
    assert!(said, "an OverlapsPair Event");
}
