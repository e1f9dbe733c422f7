//! `ferry-lab site partition|heal`: a partitioned site's replicator cannot reach its peer (the
//! pair reports PeerReachable=False and stops committing generations) while both sites stay
//! up and reachable by the harness; after `heal`, replication resumes.

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
