//! DRPair status written by two components at once: the replicator and the failover
//! controller each set their own conditions, concurrently and many times over, through
//! `ferry_runtime::PairStatus` (server-side apply, one field manager each). Neither loses the
//! other's conditions, each one's last write is what stays, and Events name the component
//! that sent them. On the lab's API server and on the real control plane.

mod common;

use common::{unique_ns, Site};
use ferry_runtime::{Component, ConditionSet, PairStatus};
use ferry_schemas::conditions::{
    ConditionStatus as S, PairConditionReason as R, PairConditionType as T,
};
use ferry_schemas::DRPair;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use kube::Client;
use serde_json::json;

/// Writes per component: enough for the two writers' reads and writes to interleave (the
/// former read–merge–merge-patch writer lost a condition within 100 rounds on both planes).
const ROUNDS: usize = 100;

async fn install_pair(client: &Client) -> (String, DRPair) {
    ferry_lab::testing::install_ferry_crds(client).await;
    let ns = unique_ns("status");
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    let pair: DRPair = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "DRPair",
        "metadata": {"name": "ledger", "namespace": ns},
        "spec": {"selector": {"matchLabels": {"app": "ledger"}},
                 "primarySite": "a", "secondarySite": "b", "rpo": "30s"}
    }))
    .unwrap();
    let pair = Api::<DRPair>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &pair)
        .await
        .expect("DRPair created");
    (ns, pair)
}

/// The condition `type_` of `pair`: (status, message).
fn condition(pair: &DRPair, type_: T) -> Option<(String, String)> {
    pair.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_.as_str())
        .map(|c| (c.status.clone(), c.message.clone()))
}

async fn both_writers_keep_their_conditions(site: &Site) {
    let client = site.client().await;
    let (ns, pair) = install_pair(&client).await;
    let replicator = PairStatus::new(site.client().await, "a", Component::Replicator);
    let controller = PairStatus::new(site.client().await, "a", Component::Controller);

    let write = |status: PairStatus, sets: fn(usize) -> Vec<ConditionSet>, fields: bool| {
        let ns = ns.clone();
        tokio::spawn(async move {
            for round in 0..ROUNDS {
                let f = if fields {
                    json!({"phase": "Replicating", "generation": round})
                } else {
                    json!({})
                };
                status
                    .apply(&ns, "ledger", f, &sets(round))
                    .await
                    .unwrap_or_else(|e| panic!("{:?} round {round}: {e}", status.component()));
            }
        })
    };
    let r = write(
        replicator.clone(),
        |round| {
            vec![
                (
                    T::Synced,
                    S::from(round % 2 == 0),
                    R::SyncSucceeded,
                    format!("r{round}"),
                ),
                (T::RpoMet, S::True, R::WithinRpo, format!("r{round}")),
            ]
        },
        true,
    );
    let c = write(
        controller.clone(),
        |round| {
            vec![
                (
                    T::FailoverBlocked,
                    S::from(round % 2 == 1),
                    R::ManualMode,
                    format!("c{round}"),
                ),
                (
                    T::WitnessQuorumLost,
                    S::False,
                    R::QuorumHeld,
                    format!("c{round}"),
                ),
            ]
        },
        false,
    );
    r.await.unwrap();
    c.await.unwrap();

    let pairs: Api<DRPair> = Api::namespaced(client.clone(), &ns);
    let got = pairs.get("ledger").await.unwrap();
    let last = ROUNDS - 1;
    let (r_last, c_last) = (format!("r{last}"), format!("c{last}"));
    let synced = if last % 2 == 0 { "True" } else { "False" };
    let blocked = if last % 2 == 1 { "True" } else { "False" };
    assert_eq!(
        condition(&got, T::Synced),
        Some((synced.into(), r_last.clone()))
    );
    assert_eq!(condition(&got, T::RpoMet), Some(("True".into(), r_last)));
    assert_eq!(
        condition(&got, T::FailoverBlocked),
        Some((blocked.into(), c_last.clone()))
    );
    assert_eq!(
        condition(&got, T::WitnessQuorumLost),
        Some(("False".into(), c_last))
    );
    let status = got.status.clone().unwrap();
    assert_eq!(status.conditions.len(), 4, "{:?}", status.conditions);
    assert_eq!(status.generation.map(|g| g.0), Some(last as u64));

    // A later write of one condition keeps the manager's other conditions and fields.
    replicator
        .apply(
            &ns,
            "ledger",
            json!({}),
            &[(T::PeerReachable, S::True, R::PeerResponding, "up".into())],
        )
        .await
        .unwrap();
    let got = pairs.get("ledger").await.unwrap();
    assert!(condition(&got, T::RpoMet).is_some() && condition(&got, T::FailoverBlocked).is_some());
    assert_eq!(
        got.status.unwrap().generation.map(|g| g.0),
        Some(last as u64)
    );

    // Events carry the name of the component that sent them.
    replicator
        .event(
            &pair,
            false,
            "SyncSucceeded",
            "Sync",
            "from the replicator".into(),
        )
        .await;
    controller
        .event(&pair, true, "Fenced", "Fence", "from the controller".into())
        .await;
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reporters: Vec<(String, String)> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| {
            (
                e.reason.unwrap_or_default(),
                e.reporting_controller.unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        reporters.contains(&("SyncSucceeded".into(), "ferry-replicator".into()))
            && reporters.contains(&("Fenced".into(), "ferry-controller".into())),
        "{reporters:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replicator_and_the_controller_write_conditions_concurrently_and_neither_is_lost() {
    both_writers_keep_their_conditions(&Site::start().await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    lab_no_kube_kit,
    ignore = "the Kubernetes control-plane kit is missing (FERRY_LAB_KUBE_BIN and etcd; .ci/run provides both)"
)]
async fn concurrent_condition_writers_on_a_real_control_plane() {
    let site = Site::start_kubernetes("concurrent_condition_writers_on_a_real_control_plane").await;
    both_writers_keep_their_conditions(&site).await
}
