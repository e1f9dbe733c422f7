//! Failback: site `a` is lost and the app fails over to `b`; when `a` comes back it demotes
//! itself, keeping its own volumes as a diverged seed, and replication from `b` to `a` ships
//! only the blocks that differ between the two sites (8 MiB of ballast the app never changes
//! stay put). A Migration of type Failback then returns the app to `a` with zero data loss:
//! `b`'s last transaction is at `a`. The app never runs at both sites at once.

mod e2e;

use ferry_lab::node::storage::bound_volume;
use ferry_schemas::{DRPair, Migration};
use ferry_sqlite_writer::ledger;
use kube::api::{Api, PostParams};
use serde_json::json;

use e2e::{
    assert_never_at_both_sites, eventually, lab_control, live_tip, sync_now, Lab, Protection, NS,
};

const BALLAST_BYTES: u64 = 8 << 20;

async fn completed(migrations: &Api<Migration>, name: &str) -> Migration {
    eventually(name, || async {
        let m = migrations.get(name).await.map_err(|e| e.to_string())?;
        let status = m.status.clone().unwrap_or_default();
        match status.phase.map(|p| p.as_str().to_string()).as_deref() {
            Some("Completed") => Ok(m),
            Some("Failed") => panic!("{name} failed: {:?}", status.conditions),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

on_both_planes!(
    the_old_primary_receives_only_diverged_blocks_and_the_app_fails_back,
    the_old_primary_receives_only_diverged_blocks_and_the_app_fails_back_on_kubernetes,
    the_old_primary_receives_only_diverged_blocks_and_the_app_fails_back_on
);

async fn the_old_primary_receives_only_diverged_blocks_and_the_app_fails_back_on(
    settings: e2e::LabSettings,
) {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, b) = e2e::setup_with_on(&lab.0, &Protection::AUTOMATIC, &settings).await;
    let volume = bound_volume(&a, NS, "ledger-data").await.unwrap().unwrap();
    let mut ballast = vec![0u8; BALLAST_BYTES as usize];
    rand::Rng::fill(&mut rand::rng(), &mut ballast[..]);
    std::fs::write(volume.path.join("ballast.bin"), &ballast).unwrap();
    sync_now(&a, "ballast").await;

    lab_control("site", "kill", "a", &lab.0);
    let failover = completed(&Api::namespaced(b.clone(), NS), "ledger-failover-2").await;
    let promoted = failover.status.and_then(|s| s.generation).unwrap().0;
    lab_control("site", "start", "a", &lab.0);

    // The first generation b commits at a after a is back: only what differs travels.
    let at_b: Api<DRPair> = Api::namespaced(b.clone(), NS);
    let (generation, bytes, message) = eventually("the first sync back to a", || async {
        let p = at_b.get("ledger").await.map_err(|e| e.to_string())?;
        let s = p.status.unwrap_or_default();
        let synced = s.conditions.iter().find(|c| c.type_ == "Synced");
        match (s.generation.map(|g| g.0), s.last_sync_bytes, synced) {
            (Some(g), Some(bytes), Some(c)) if g > promoted && c.status == "True" => {
                Ok((g, bytes, c.message.clone()))
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    println!(
        "first sync back b -> a: generation {generation}, {bytes} bytes on the wire \
         (the volume holds {BALLAST_BYTES} bytes of ballast); {message}"
    );
    assert!(
        bytes < BALLAST_BYTES / 8,
        "only the blocks that differ between the sites travel back: {bytes} bytes"
    );
    let at_a: Api<DRPair> = Api::namespaced(a.clone(), NS);
    let demoted = at_a.get("ledger").await.unwrap().status.unwrap_or_default();
    assert_eq!(
        (demoted.epoch.map(|e| e.0), demoted.active_site.as_deref()),
        (Some(2), Some("b"))
    );

    // Back to the primary.
    let migrations: Api<Migration> = Api::namespaced(b.clone(), NS);
    let failback: Migration = serde_json::from_value(
        json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "Migration",
        "metadata": {"name": "back-to-a", "namespace": NS},
        "spec": {"pair": "ledger", "targetSite": "a", "type": "Failback"}}),
    )
    .unwrap();
    migrations
        .create(&PostParams::default(), &failback)
        .await
        .unwrap();
    let done = completed(&migrations, "back-to-a").await;
    let last_at_b = live_tip(&b).await;
    let volume_a = bound_volume(&a, NS, "ledger-data").await.unwrap().unwrap();
    let conn = ledger::open_existing(&volume_a.path).unwrap();
    assert_eq!(
        ledger::hash_of(&conn, last_at_b.n).unwrap(),
        Some(last_at_b.hash),
        "b's last transaction {} is at a with the same chain hash",
        last_at_b.n
    );
    println!(
        "failback completed: rtoSeconds {:?}, dataLossSeconds {:?}; b's last transaction {} is at a",
        done.status.as_ref().and_then(|s| s.rto_seconds),
        done.status.as_ref().and_then(|s| s.data_loss_seconds),
        last_at_b.n
    );
    assert_eq!(
        std::fs::read(volume_a.path.join("ballast.bin")).unwrap(),
        ballast,
        "the ballast is intact at a"
    );
    eventually("the app writing at a again", || async {
        let tip = live_tip(&a).await;
        (tip.n > last_at_b.n)
            .then_some(())
            .ok_or(format!("tip {}", tip.n))
    })
    .await;
    assert_never_at_both_sites(&lab.0);
}
