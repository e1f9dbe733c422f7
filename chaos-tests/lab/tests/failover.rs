//! Automatic failover on the lab, with three witnesses, an 8 s lease and the pair's
//! `siteLossTimeout: 10s`, the ledger writer running at site `a` behind the `ferry-gate`
//! init container:
//! - site loss: every process of `a` killed; `b` runs the app within siteLossTimeout + lease +
//!   10 s, holding every transaction of the generation it was promoted from;
//! - partition: `a` cut off from `b` and the witnesses keeps running; it fences itself before
//!   `b` is promoted, and after the heal it learns the new epoch and never starts the app;
//! - witness losses: one of three down changes nothing; two down fail over nothing, the pair
//!   reports `WitnessQuorumLost`, `a` fences itself when its lease ends and resumes when the
//!   quorum is back;
//! - controller down: `a`'s controller is scaled to zero while the site runs; the fence
//!   sidecar stops the app at the end of the lease, before `b` is promoted;
//! - manual mode: a lost site is not failed over on its own (`FailoverBlocked`, reason
//!   `ManualMode`); a person's Failover Migration is refused without a quorum and carried
//!   out with one.
//!
//! Every test checks the sites' timelines: the app never runs at both sites at once. The
//! scenarios run one at a time (each is a whole lab on a 2-core machine).

mod e2e;

use std::time::Duration;

use ferry_lab::node::timeline::{now_ms, TimelineEvent};
use ferry_schemas::{DRPair, Migration};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::Client;
use tokio::sync::Mutex;

use e2e::{
    assert_never_at_both_sites, eventually, generation_tip, lab_control, last_start, setup_with,
    timelines, Lab, Protection, NS,
};

const LEASE: Duration = Duration::from_secs(8);

/// One lab at a time: the scenarios run in one test binary, whose tests run in parallel.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// The pair's status and one condition's (status, reason) at a site.
async fn pair_at(client: &Client) -> Result<DRPair, String> {
    Api::<DRPair>::namespaced(client.clone(), NS)
        .get("ledger")
        .await
        .map_err(|e| e.to_string())
}

/// A condition's (status, reason).
fn condition(pair: &DRPair, type_: &str) -> Option<(String, String)> {
    e2e::condition(pair, type_).map(|c| (c.status, c.reason))
}

fn phase(pair: &DRPair) -> String {
    pair.status
        .as_ref()
        .and_then(|s| s.phase)
        .map(|p| p.as_str().to_string())
        .unwrap_or_default()
}

/// Waits for the Failover Migration the quorum's decision creates at `b`, until it completes.
async fn completed_failover(b: &Client, epoch: u64) -> Migration {
    let migrations: Api<Migration> = Api::namespaced(b.clone(), NS);
    let name = format!("ledger-failover-{epoch}");
    eventually("the failover at b", || async {
        let m = migrations.get(&name).await.map_err(|e| e.to_string())?;
        let status = m.status.clone().unwrap_or_default();
        match status.phase.map(|p| p.as_str().to_string()).as_deref() {
            Some("Completed") => Ok(m),
            Some("Failed") => panic!("failover failed: {:?}", status.conditions),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// When (ms) the app last stopped at a site.
fn last_stop(entries: &[ferry_lab::node::timeline::TimelineEntry]) -> Option<u64> {
    entries
        .iter()
        .filter(|e| e.app.as_deref() == Some("ledger") && e.event == TimelineEvent::Stop)
        .map(|e| e.at_ms)
        .max()
}

/// After a's loss of the lease from `fault_at` (ms): waits for b's failover to epoch 2, then
/// checks from the timelines that a's app stopped before b's started and never ran at both
/// sites; prints the two intervals, naming the fault `what`.
async fn assert_a_stops_before_b_starts(
    lab: &std::path::Path,
    b: &Client,
    fault_at: u64,
    what: &str,
) {
    completed_failover(b, 2).await;
    let (at_a, at_b) = timelines(lab);
    let stopped_a = last_stop(&at_a).expect("the app stopped at a");
    let started_b = last_start(&at_b).expect("the app started at b");
    println!(
        "{what} at {fault_at}: a stopped the app {} ms later, b started it {} ms after that",
        stopped_a - fault_at,
        started_b - stopped_a
    );
    assert!(stopped_a < started_b, "a's app stops before b's starts");
    assert_never_at_both_sites(lab);
}

on_both_planes!(
    site_loss_b_runs_the_app_with_every_transaction_of_its_generation,
    site_loss_b_runs_the_app_with_every_transaction_of_its_generation_on_kubernetes,
    site_loss_b_runs_the_app_with_every_transaction_of_its_generation_on
);

async fn site_loss_b_runs_the_app_with_every_transaction_of_its_generation_on(
    settings: e2e::LabSettings,
) {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (_a, b) = e2e::setup_with_on(&lab.0, &Protection::AUTOMATIC, &settings).await;

    let killed_at = now_ms();
    lab_control("site", "kill", "a", &lab.0);
    let migration = completed_failover(&b, 2).await;
    let started_at = last_start(&timelines(&lab.0).1).expect("the app started at b");
    let bound_ms =
        (Protection::SITE_LOSS_TIMEOUT_SECONDS * 1000) + LEASE.as_millis() as u64 + 10_000;
    let status = migration.status.clone().unwrap_or_default();
    println!(
        "site a killed at {killed_at}; app running at b {} ms later (bound {bound_ms} ms); \
         rtoSeconds {:?}, dataLossSeconds {:?}, generation {:?}",
        started_at - killed_at,
        status.rto_seconds,
        status.data_loss_seconds,
        status.generation
    );
    assert!(
        started_at - killed_at <= bound_ms,
        "b started the app {} ms after the kill; bound {bound_ms} ms",
        started_at - killed_at
    );

    // The replica b was promoted from, and the app now running on it.
    let generation = status.generation.expect("status.generation").0;
    let (promoted, intact) = generation_tip(&b, generation).await;
    assert!(intact, "generation {generation}'s ledger verifies");
    let live = e2e::writer_commits_past(&b, "b", promoted.n).await;
    let volume = ferry_lab::node::storage::bound_volume(&b, NS, "ledger-data")
        .await
        .unwrap()
        .unwrap();
    let conn = ferry_sqlite_writer::ledger::open_existing(&volume.path).unwrap();
    assert_eq!(
        ferry_sqlite_writer::ledger::hash_of(&conn, promoted.n).unwrap(),
        Some(promoted.hash),
        "transaction {} of generation {generation} is at b, with the same chain hash",
        promoted.n
    );
    assert!(matches!(
        ferry_sqlite_writer::ledger::verify(&conn).unwrap(),
        ferry_sqlite_writer::ledger::Verdict::Ok { .. }
    ));
    println!(
        "b holds transactions 1..={} of generation {generation} and has committed up to {} since",
        promoted.n, live.n
    );
    assert_never_at_both_sites(&lab.0);
}

on_both_planes!(
    a_partitioned_site_fences_itself_before_b_is_promoted,
    a_partitioned_site_fences_itself_before_b_is_promoted_on_kubernetes,
    a_partitioned_site_fences_itself_before_b_is_promoted_on
);

async fn a_partitioned_site_fences_itself_before_b_is_promoted_on(settings: e2e::LabSettings) {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, b) = e2e::setup_with_on(&lab.0, &Protection::AUTOMATIC, &settings).await;

    let cut_at = now_ms();
    let said = lab_control("site", "partition", "a", &lab.0);
    assert!(said.contains("and 3 witnesses"), "{said}");
    eventually("a fenced", || async {
        let p = pair_at(&a).await?;
        (phase(&p) == "Fenced").then_some(()).ok_or(phase(&p))
    })
    .await;
    assert_a_stops_before_b_starts(&lab.0, &b, cut_at, "partitioned").await;

    let healed_at = now_ms();
    lab_control("site", "heal", "a", &lab.0);
    let p = eventually("a demoted, receiving from b", || async {
        let p = pair_at(&a).await?;
        let s = p.status.clone().unwrap_or_default();
        match (
            s.epoch.map(|e| e.0),
            s.active_site.as_deref(),
            phase(&p).as_str(),
        ) {
            (Some(2), Some("b"), "Replicating") => Ok(p),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    println!(
        "after the heal a holds epoch 2, active site b, generation {:?}",
        p.status.and_then(|s| s.generation)
    );
    assert!(
        last_start(&timelines(&lab.0).0).is_none_or(|t| t < healed_at),
        "the old primary never starts the app again on its own"
    );
    assert!(
        Api::<Lease>::namespaced(a.clone(), NS)
            .get_opt("ferry-lease-ledger")
            .await
            .unwrap()
            .is_none(),
        "a holds no Lease for the app"
    );
    assert_never_at_both_sites(&lab.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_losses_one_changes_nothing_two_fail_over_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, b) = setup_with(&lab.0, &Protection::AUTOMATIC).await;
    let leases: Api<Lease> = Api::namespaced(a.clone(), NS);
    let renewed = || async {
        let lease = leases
            .get("ferry-lease-ledger")
            .await
            .map_err(|e| e.to_string())?;
        lease
            .spec
            .and_then(|s| s.renew_time)
            .map(|t| t.0.as_millisecond())
            .ok_or_else(|| "no renewTime".to_string())
    };

    // One of three down: renewals go on (at least three, one per lease quarter).
    lab_control("witness", "kill", "1", &lab.0);
    let from = eventually("the lease", renewed).await;
    let to = eventually("three renewals with a witness down", || async {
        let p = pair_at(&a).await?;
        assert_ne!(phase(&p), "Fenced", "one witness down must not fence a");
        let t = renewed().await?;
        if t >= from + 3 * (LEASE.as_millis() as i64) / 4 {
            Ok(t)
        } else {
            Err(format!("renewed at {t}"))
        }
    })
    .await;
    println!(
        "with witness 1 down the lease was renewed through {} ms",
        to - from
    );
    assert_eq!(
        condition(&pair_at(&a).await.unwrap(), "WitnessQuorumLost").map(|c| c.0),
        Some("False".into())
    );

    // Two of three down: no quorum; a fences itself once its lease ends, nothing fails over.
    lab_control("witness", "kill", "2", &lab.0);
    let lost_at = now_ms();
    eventually("WitnessQuorumLost at a", || async {
        let p = pair_at(&a).await?;
        match condition(&p, "WitnessQuorumLost") {
            Some((s, r)) if s == "True" && r == "QuorumLost" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("a fenced at the end of its lease", || async {
        let p = pair_at(&a).await?;
        (phase(&p) == "Fenced").then_some(()).ok_or(phase(&p))
    })
    .await;
    let fenced_after = now_ms() - lost_at;
    // Watch b for longer than a failover would take: no Migration, no app.
    let window = Duration::from_secs(Protection::SITE_LOSS_TIMEOUT_SECONDS) + LEASE * 2;
    let migrations: Api<Migration> = Api::namespaced(b.clone(), NS);
    let deadline = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < deadline {
        let list = migrations.list(&Default::default()).await.unwrap();
        assert!(
            list.items.is_empty(),
            "no failover without a quorum: {:?}",
            list.items
        );
        assert!(
            last_start(&timelines(&lab.0).1).is_none(),
            "the app never starts at b"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "with two witnesses down a fenced itself {fenced_after} ms after the loss; b ran nothing for {window:?}"
    );

    // The quorum is back: a renews at the same epoch and runs the app again.
    let back_at = now_ms();
    lab_control("witness", "start", "1", &lab.0);
    lab_control("witness", "start", "2", &lab.0);
    eventually("a unfenced", || async {
        let p = pair_at(&a).await?;
        let epoch = p.status.as_ref().and_then(|s| s.epoch).map(|e| e.0);
        match (phase(&p).as_str(), epoch) {
            ("Replicating", Some(1)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("the app running at a again", || async {
        match last_start(&timelines(&lab.0).0) {
            Some(t) if t > back_at => Ok(()),
            other => Err(format!("last start {other:?}")),
        }
    })
    .await;
    assert_never_at_both_sites(&lab.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_mode_fails_over_only_on_a_migration_and_only_with_a_quorum() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (_a, b) = setup_with(&lab.0, &Protection::MANUAL).await;
    lab_control("site", "kill", "a", &lab.0);

    // Longer than an automatic failover would take: nothing moves, and b says why.
    let migrations: Api<Migration> = Api::namespaced(b.clone(), NS);
    let window =
        Duration::from_secs(Protection::SITE_LOSS_TIMEOUT_SECONDS) + LEASE + Duration::from_secs(2);
    let deadline = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < deadline {
        let list = migrations.list(&Default::default()).await.unwrap();
        assert!(
            list.items.is_empty(),
            "no failover on its own in Manual mode: {:?}",
            list.items
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let p = pair_at(&b).await.unwrap();
    assert_eq!(
        condition(&p, "FailoverBlocked"),
        Some(("True".into(), "ManualMode".into()))
    );

    let failover = |name: &str| -> Migration {
        serde_json::from_value(
            serde_json::json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "Migration",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"pair": "ledger", "targetSite": "b", "type": "Failover"}}),
        )
        .unwrap()
    };
    // Without a quorum the request is refused.
    lab_control("witness", "kill", "1", &lab.0);
    lab_control("witness", "kill", "2", &lab.0);
    migrations
        .create(&Default::default(), &failover("by-hand-1"))
        .await
        .unwrap();
    let refused = eventually("the first request refused", || async {
        let m = migrations
            .get("by-hand-1")
            .await
            .map_err(|e| e.to_string())?;
        let s = m.status.unwrap_or_default();
        match s.phase.map(|p| p.as_str().to_string()).as_deref() {
            Some("Failed") => Ok(s.conditions),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let failed = refused
        .iter()
        .find(|c| c.type_ == "Failed")
        .expect("Failed condition");
    println!(
        "refused without a quorum: {}: {}",
        failed.reason, failed.message
    );
    assert_eq!(failed.reason, "QuorumUnavailable");
    assert!(
        last_start(&timelines(&lab.0).1).is_none(),
        "nothing ran at b"
    );

    // With the quorum back, the same request is carried out.
    lab_control("witness", "start", "1", &lab.0);
    lab_control("witness", "start", "2", &lab.0);
    migrations
        .create(&Default::default(), &failover("by-hand-2"))
        .await
        .unwrap();
    let done = e2e::completed_migration(&b, "by-hand-2").await;
    println!(
        "manual failover: epoch {:?}, generation {:?}, rtoSeconds {:?}, dataLossSeconds {:?}",
        done.epoch, done.generation, done.rto_seconds, done.data_loss_seconds
    );
    let (promoted, intact) = generation_tip(&b, done.generation.unwrap().0).await;
    assert!(intact);
    e2e::writer_commits_past(&b, "b", promoted.n).await;
    assert_never_at_both_sites(&lab.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_controller_gone_a_site_still_stops_the_app_before_the_peer_takes_over() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, b) = setup_with(&lab.0, &Protection::AUTOMATIC).await;
    let controllers: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(a.clone(), "ferry-system");
    let scale = |replicas: i32| serde_json::json!({"spec": {"replicas": replicas}});
    let down_at = now_ms();
    controllers
        .patch(
            "ferry-controller",
            &Default::default(),
            &kube::api::Patch::Merge(&scale(0)),
        )
        .await
        .unwrap();
    // The fence sidecar stops the app at a.
    let what = "controller at a scaled to zero";
    assert_a_stops_before_b_starts(&lab.0, &b, down_at, what).await;

    // The controller comes back: a is demoted and runs nothing.
    let back_at = now_ms();
    controllers
        .patch(
            "ferry-controller",
            &Default::default(),
            &kube::api::Patch::Merge(&scale(1)),
        )
        .await
        .unwrap();
    eventually("a demoted", || async {
        let p = pair_at(&a).await?;
        let s = p.status.clone().unwrap_or_default();
        match (s.epoch.map(|e| e.0), s.active_site.as_deref()) {
            (Some(2), Some("b")) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        last_start(&timelines(&lab.0).0).is_none_or(|t| t < back_at),
        "the app never started again at a"
    );
    assert_never_at_both_sites(&lab.0);
}
