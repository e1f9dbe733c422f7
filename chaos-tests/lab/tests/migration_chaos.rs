//! A planned migration survives its controller being killed with SIGKILL in each phase: every
//! run ends Completed (or Failed with the app running at exactly one site), and the sites'
//! timelines never show the app at both sites at once. The kill delay inside each phase is
//! drawn from a seeded RNG; the seed is printed (set FERRY_TEST_SEED to replay).

mod e2e;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_lab::node::timeline::{first_overlap, read, running_intervals, running_pid};
use ferry_lab::sites::SiteLayout;
use ferry_schemas::Migration;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use rand::{Rng, SeedableRng};
use serde_json::json;

use e2e::{eventually, Lab, NS, T};

/// The pid of the running ferry-controller process at `site`, from the site's timeline.
fn controller_pid(lab: &Path, site: &str) -> Option<u32> {
    let entries = read(&SiteLayout::in_lab(lab, site).timeline()).ok()?;
    running_pid(&entries, "ferry-system", "ferry-controller-")
}

on_both_planes!(
    killing_the_controller_in_each_phase_never_runs_the_app_twice,
    killing_the_controller_in_each_phase_never_runs_the_app_twice_on_kubernetes,
    killing_the_controller_in_each_phase_never_runs_the_app_twice_on
);

async fn killing_the_controller_in_each_phase_never_runs_the_app_twice_on(
    settings: e2e::LabSettings,
) {
    let seed: u64 = std::env::var("FERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("FERRY_TEST_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for phase in ["Quiescing", "FinalSync", "Promoting", "Instantiating"] {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab(dir.path().join("lab"));
        let (a, b) = e2e::setup_on(&lab.0, &settings).await;
        let migrations: Api<Migration> = Api::namespaced(a.clone(), NS);
        let mut phases = watcher(
            migrations.clone(),
            watcher::Config::default().fields("metadata.name=to-b"),
        )
        .applied_objects()
        .boxed();
        let migration: Migration = serde_json::from_value(json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "Migration",
            "metadata": {"name": "to-b", "namespace": NS}, "spec": {"pair": "ledger", "targetSite": "b"}})).unwrap();
        migrations
            .create(&PostParams::default(), &migration)
            .await
            .unwrap();
        // Kill when the phase is first seen, after a random delay within it.
        let delay = Duration::from_millis(rng.random_range(0..150));
        let mut killed_in = None;
        while let Some(Ok(m)) = tokio::time::timeout(T, phases.next())
            .await
            .expect("migration progresses")
        {
            let current = m
                .status
                .and_then(|s| s.phase)
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            if killed_in.is_none()
                && (current == phase || ["Completed", "Failed"].contains(&current.as_str()))
            {
                tokio::time::sleep(delay).await;
                let pid = controller_pid(&lab.0, "a").expect("the controller runs at a");
                Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status()
                    .unwrap();
                killed_in = Some(current.clone());
                println!(
                    "phase {phase}: killed controller pid {pid} {delay:?} after seeing {current}"
                );
            }
            if ["Completed", "Failed"].contains(&current.as_str()) && killed_in.is_some() {
                break;
            }
        }
        let end = eventually("the migration to end", || async {
            let m = migrations.get("to-b").await.map_err(|e| e.to_string())?;
            let s = m.status.unwrap_or_default();
            match s.phase.map(|p| p.as_str().to_string()) {
                Some(p) if p == "Completed" || p == "Failed" => Ok((p, s.conditions)),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        println!("phase {phase}: migration ended {}", end.0);
        // The app runs at exactly one site.
        let ready = |client: Client| async move {
            Api::<Deployment>::namespaced(client, NS)
                .get_opt("ledger")
                .await
                .unwrap()
                .and_then(|d| d.status)
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0)
        };
        let (at_a, at_b) = (ready(a.clone()).await, ready(b.clone()).await);
        if end.0 == "Completed" {
            assert_eq!(
                (at_a, at_b),
                (0, 1),
                "phase {phase}: after Completed the app runs at b only"
            );
        } else {
            assert_eq!(
                at_a + at_b,
                1,
                "phase {phase}: Failed ({:?}) leaves the app at exactly one site",
                end.1
            );
        }
        let ta = read(&SiteLayout::in_lab(&lab.0, "a").timeline()).unwrap();
        let tb = read(&SiteLayout::in_lab(&lab.0, "b").timeline()).unwrap();
        assert!(!running_intervals(&ta, "ledger").is_empty());
        assert_eq!(
            first_overlap(&ta, &tb, "ledger"),
            None,
            "phase {phase}: the app never ran at both sites at once"
        );
    }
}
