//! Migrating back: after a planned migration a → b, replication flows b → a, and a second
//! planned migration brings the app back to a with zero data loss (b's last transaction is at
//! a), replacing a's stale PVC with one from the final generation. The sites' timelines never
//! overlap. The first sync back ships only what changed at b: the old source's volumes were kept
//! as the seed of the promoted generation.

mod e2e;

use ferry_lab::node::storage::bound_volume;
use ferry_lab::node::timeline::{first_overlap, read};
use ferry_lab::sites::SiteLayout;
use ferry_schemas::{DRPair, Migration};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, PostParams};
use kube::Client;
use serde_json::json;

use e2e::{eventually, Lab, NS};

const BALLAST_BYTES: u64 = 8 << 20;

async fn migrate(client: &Client, name: &str, target: &str) {
    let migrations: Api<Migration> = Api::namespaced(client.clone(), NS);
    let migration: Migration = serde_json::from_value(json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "Migration",
        "metadata": {"name": name, "namespace": NS}, "spec": {"pair": "ledger", "targetSite": target}})).unwrap();
    migrations
        .create(&PostParams::default(), &migration)
        .await
        .unwrap();
    let (phase, conditions) = eventually(&format!("migration {name}"), || async {
        let s = migrations
            .get(name)
            .await
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default();
        match s.phase.map(|p| p.as_str().to_string()) {
            Some(p) if p == "Completed" || p == "Failed" => Ok((p, s.conditions)),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(phase, "Completed", "{conditions:?}");
}

async fn tip(client: &Client) -> ferry_sqlite_writer::ledger::Tip {
    let volume = bound_volume(client, NS, "ledger-data")
        .await
        .unwrap()
        .expect("bound");
    let conn = ferry_sqlite_writer::ledger::open_existing(&volume.path).unwrap();
    ferry_sqlite_writer::ledger::tip(&conn)
        .unwrap()
        .expect("rows")
}

on_both_planes!(
    an_app_migrates_to_b_and_back_to_a_without_losing_a_transaction,
    an_app_migrates_to_b_and_back_to_a_without_losing_a_transaction_on_kubernetes,
    an_app_migrates_to_b_and_back_to_a_without_losing_a_transaction_on
);

async fn an_app_migrates_to_b_and_back_to_a_without_losing_a_transaction_on(
    settings: e2e::LabSettings,
) {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, b) = e2e::setup_on(&lab.0, &settings).await;
    // 8 MiB the app never changes: a full copy back would ship it again, a delta does not.
    let volume = bound_volume(&a, NS, "ledger-data")
        .await
        .unwrap()
        .expect("bound");
    let mut ballast = vec![0u8; BALLAST_BYTES as usize];
    rand::Rng::fill(&mut rand::rng(), &mut ballast[..]);
    std::fs::write(volume.path.join("ballast.bin"), &ballast).unwrap();
    migrate(&a, "to-b", "b").await;
    let at_b: Api<DRPair> = Api::namespaced(b.clone(), NS);
    let promoted = at_b
        .get("ledger")
        .await
        .unwrap()
        .status
        .unwrap()
        .generation
        .unwrap()
        .0;
    // Replication flows back: b ships a newer generation to a.
    let reverse = eventually("a generation shipped from b to a", || async {
        let s = at_b
            .get("ledger")
            .await
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default();
        match (s.active_site.as_deref(), s.generation, s.last_sync_bytes) {
            (Some("b"), Some(g), Some(bytes)) if g.0 > promoted => Ok(bytes),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    println!("first sync b → a shipped {reverse} bytes (the volume holds {BALLAST_BYTES} bytes of ballast)");
    assert!(
        reverse < BALLAST_BYTES / 8,
        "only blocks changed at b travel back: {reverse} bytes"
    );

    migrate(&b, "to-a", "a").await;
    let last_at_b = tip(&b).await;
    eventually("the app ready at a", || async {
        let d = Api::<Deployment>::namespaced(a.clone(), NS)
            .get("ledger")
            .await
            .map_err(|e| e.to_string())?;
        match d.status.and_then(|s| s.ready_replicas) {
            Some(1) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let volume = bound_volume(&a, NS, "ledger-data")
        .await
        .unwrap()
        .expect("bound");
    let conn = ferry_sqlite_writer::ledger::open_existing(&volume.path).unwrap();
    assert!(matches!(
        ferry_sqlite_writer::ledger::verify(&conn).unwrap(),
        ferry_sqlite_writer::ledger::Verdict::Ok { .. }
    ));
    assert_eq!(
        ferry_sqlite_writer::ledger::hash_of(&conn, last_at_b.n).unwrap(),
        Some(last_at_b.hash),
        "transaction {} committed at b before the quiesce is at a",
        last_at_b.n
    );
    let b_replicas = Api::<Deployment>::namespaced(b.clone(), NS)
        .get("ledger")
        .await
        .unwrap()
        .spec
        .unwrap()
        .replicas;
    assert_eq!(b_replicas, Some(0), "b stays scaled to zero");
    let ta = read(&SiteLayout::in_lab(&lab.0, "a").timeline()).unwrap();
    let tb = read(&SiteLayout::in_lab(&lab.0, "b").timeline()).unwrap();
    assert_eq!(
        first_overlap(&ta, &tb, "ledger"),
        None,
        "never at both sites at once"
    );
}
