//! `ferry-lab site partition|heal`: a partitioned site's replicator cannot reach its peer (the
//! pair reports PeerReachable=False, stops committing generations, and its lag grows past the
//! RPO with RPOMet=False) while both sites stay up and reachable by the harness; after
//! `heal`, replication resumes.

mod e2e;

use ferry_schemas::DRPair;
use kube::api::Api;

use e2e::{eventually, lab_control, Lab, NS};

/// A condition's (status, message).
fn condition(pair: &DRPair, type_: &str) -> Option<(String, String)> {
    e2e::condition(pair, type_).map(|c| (c.status, c.message))
}

on_both_planes!(
    a_partitioned_site_loses_its_peer_until_healed,
    a_partitioned_site_loses_its_peer_until_healed_on_kubernetes,
    a_partitioned_site_loses_its_peer_until_healed_on
);

async fn a_partitioned_site_loses_its_peer_until_healed_on(settings: e2e::LabSettings) {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, b) = e2e::setup_on(&lab.0, &settings).await;
    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NS);

    let said = lab_control("site", "partition", "a", &lab.0);
    assert!(said.contains("site a: partitioned from b"), "{said}");
    let message = eventually("the peer unreachable from a", || async {
        let p = pairs.get("ledger").await.map_err(|e| e.to_string())?;
        match condition(&p, "PeerReachable") {
            Some((s, m)) if s == "False" => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    println!("while partitioned: {message}");
    // The active site's own view says the copy is getting old: past the 30 s rpo, RPOMet=False
    // with a lag that keeps growing, not the lag of its last sync.
    let first = eventually("RPOMet=False at a while cut off", || async {
        let p = pairs.get("ledger").await.map_err(|e| e.to_string())?;
        let lag = p.status.as_ref().and_then(|s| s.current_lag_seconds);
        match (condition(&p, "RPOMet"), lag) {
            (Some((s, _)), Some(lag)) if s == "False" && lag > 30.0 => Ok(lag),
            other => Err(format!(
                "{other:?}, phase {:?}, PeerReachable {:?}, Synced {:?}",
                p.status.as_ref().and_then(|s| s.phase),
                condition(&p, "PeerReachable"),
                condition(&p, "Synced")
            )),
        }
    })
    .await;
    eventually("the lag at a growing", || async {
        let p = pairs.get("ledger").await.map_err(|e| e.to_string())?;
        let lag = p
            .status
            .and_then(|s| s.current_lag_seconds)
            .unwrap_or_default();
        (lag >= first + 2.0)
            .then_some(())
            .ok_or(format!("lag {lag}, first seen {first}"))
    })
    .await;
    // Both sites still answer the harness.
    let generation_at_b = Api::<DRPair>::namespaced(b.clone(), NS)
        .get("ledger")
        .await
        .unwrap()
        .status
        .unwrap()
        .generation;
    // No generation can commit across the partition, even on request.
    let stuck = pairs
        .get("ledger")
        .await
        .unwrap()
        .status
        .unwrap()
        .generation;

    let said = lab_control("site", "heal", "a", &lab.0);
    assert!(said.contains("healed"), "{said}");
    let after = eventually("replication resumed after heal", || async {
        let p = pairs.get("ledger").await.map_err(|e| e.to_string())?;
        let generation = p.status.as_ref().and_then(|s| s.generation);
        match (condition(&p, "PeerReachable"), generation) {
            (Some((s, _)), Some(g)) if s == "True" && Some(g) > stuck => Ok(g.0),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    println!("generation at b before heal {generation_at_b:?}, after heal {after}");
}
