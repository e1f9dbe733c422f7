//! The DR site tells the truth on its own: with the source site killed (a power cut of every
//! process of `a`, manual failover so nothing moves), site `b`'s DRPair shows within a few
//! seconds of the RPO passing a lag that keeps growing, `RPOMet=False` naming the silence,
//! phase `Stale` and a `SourceSilent` Event; not the `Replicating` of its last commit.

mod e2e;

use e2e::{eventually, lab_control, setup_with_on, Lab, Protection, NS};
use ferry_schemas::drpair::PairPhase;
use ferry_schemas::DRPair;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};

on_both_planes!(
    the_dr_site_reports_a_silent_source_on_its_own,
    the_dr_site_reports_a_silent_source_on_its_own_on_kubernetes,
    the_dr_site_reports_a_silent_source_on_its_own_on
);

async fn the_dr_site_reports_a_silent_source_on_its_own_on(settings: e2e::LabSettings) {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (_a, b) = setup_with_on(&lab.0, &Protection::PLANNED, &settings).await;
    let pairs: Api<DRPair> = Api::namespaced(b.clone(), NS);
    let before = pairs
        .get("ledger")
        .await
        .unwrap()
        .status
        .unwrap_or_default();
    assert_eq!(before.phase, Some(PairPhase::Replicating), "{before:?}");

    lab_control("site", "kill", "a", &lab.0);
    // The pair's rpo is 30 s: past it, b says the source is silent.
    let stale = eventually("phase Stale and RPOMet=False at b", || async {
        let p = pairs.get("ledger").await.map_err(|e| e.to_string())?;
        let s = p.status.unwrap_or_default();
        let rpo_met = s.conditions.iter().find(|c| c.type_ == "RPOMet").cloned();
        match (&s.phase, &rpo_met) {
            (Some(PairPhase::Stale), Some(c))
                if c.status == "False" && c.message.contains("the source is silent") =>
            {
                Ok(s)
            }
            _ => Err(format!("phase {:?}, RPOMet {rpo_met:?}", s.phase)),
        }
    })
    .await;
    let first = stale.current_lag_seconds.unwrap_or_default();
    assert!(first > 30.0, "lag {first}s is past the 30 s rpo");
    assert_eq!(stale.rpo_met, Some(false));
    // And the lag keeps growing on b's clock, with nothing arriving from a.
    eventually("the lag at b growing", || async {
        let p = pairs.get("ledger").await.map_err(|e| e.to_string())?;
        let lag = p
            .status
            .unwrap_or_default()
            .current_lag_seconds
            .unwrap_or_default();
        if lag >= first + 2.0 {
            Ok(())
        } else {
            Err(format!("lag {lag}s, first seen {first}s"))
        }
    })
    .await;
    let events: Api<Event> = Api::namespaced(b.clone(), NS);
    let said = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .any(|e| e.reason.as_deref() == Some("SourceSilent"));
    assert!(said, "a SourceSilent Event at b");
}
