//! The Helm chart (`deploy/helm/ferry`): `deploy/base/` is exactly its rendering with the
//! default values (so the lab, which installs `deploy/`, runs the chart), it passes
//! `helm lint --strict`, its values schema refuses bad values naming the field, and
//! `helm install`, `upgrade` and `uninstall` against a lab site bring Ferry's components up,
//! change them and take them away.
//!
//! Skipped with a message where helm is absent; under CI (`CI=true`) its absence fails, since
//! `.ci/install-test-deps.sh` installs it.

mod e2e;

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_lab::site::client_from;
use ferry_replicator::tls::CertificateAuthority;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

use e2e::{eventually, Lab};

const NAMESPACE: &str = "ferry-system";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The helm binary: `HELM`, else `helm` on PATH. Panics with the install hint where neither
/// runs (the tests that need it are listed as ignored then, outside CI: `lab_no_helm`).
fn helm_binary() -> String {
    let helm = std::env::var("HELM").unwrap_or_else(|_| "helm".into());
    let found = Command::new(&helm)
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "helm not found (set HELM or put helm on PATH; .ci/install-test-deps.sh installs it)"
    );
    helm
}

/// Runs `helm args` (with `kubeconfig`, if any); panics with its output unless it succeeds.
fn helm(helm: &str, kubeconfig: Option<&Path>, args: &[&str]) -> String {
    let mut command = Command::new("timeout");
    command.arg("120").arg(helm).args(args);
    if let Some(kubeconfig) = kubeconfig {
        command.arg("--kubeconfig").arg(kubeconfig);
    }
    let out = command.output().expect("helm runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "helm {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
#[cfg_attr(
    lab_no_helm,
    ignore = "helm not found (set HELM or put helm on PATH; .ci/install-test-deps.sh installs it)"
)]
fn deploy_base_is_the_charts_rendering_and_the_chart_lints() {
    let helm_bin = helm_binary();
    let out = Command::new("bash")
        .arg(workspace().join("deploy/render.sh"))
        .arg("--check")
        .env("HELM", &helm_bin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy/base differs from the chart's rendering:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let chart = workspace().join("deploy/helm/ferry");
    let lint = helm(
        &helm_bin,
        None,
        &["lint", "--strict", chart.to_str().unwrap()],
    );
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    // Per-site values render the ConfigMap the components read.
    let rendered = helm(
        &helm_bin,
        None,
        &[
            "template",
            "ferry",
            chart.to_str().unwrap(),
            "--namespace",
            NAMESPACE,
            "--set",
            "site.name=a,site.witnesses={w1:7201,w2:7201,w3:7201},site.lease=7s",
            "--show-only",
            "templates/site.yaml",
        ],
    );
    let config: serde_json::Value = serde_yaml::from_str(&rendered).unwrap();
    assert_eq!(
        config["data"],
        json!({"site": "a", "witnesses": "w1:7201,w2:7201,w3:7201", "lease": "7s"}),
        "{rendered}"
    );
    // values.schema.json refuses bad values, naming the field.
    for (set, says) in [
        (
            "replicator.retain=0",
            "replicator.retain: Must be greater than or equal to 1",
        ),
        ("site.lease=ten", "site.lease: Does not match pattern"),
        ("site.name=Site_A", "site.name: Does not match pattern"),
        ("site.witnesses={w1:7201,w2:7201}", "site.witnesses"),
        (
            "replicator.retian=3",
            "Additional property retian is not allowed",
        ),
    ] {
        let out = Command::new(&helm_bin)
            .args(["template", "ferry", chart.to_str().unwrap(), "--set", set])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "--set {set}: {stderr}"
        );
    }
}

async fn ready_replicas(deployments: &Api<Deployment>, name: &str) -> Result<Deployment, String> {
    let d = deployments
        .get_opt(name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("absent")?;
    let status = d.status.clone().unwrap_or_default();
    let current = d.metadata.generation == status.observed_generation;
    if current && status.ready_replicas == Some(1) && status.updated_replicas == Some(1) {
        Ok(d)
    } else {
        Err(format!("{status:?}"))
    }
}

/// The arguments of the running replicator pod's container.
async fn replicator_args(pods: &Api<Pod>) -> Result<Vec<String>, String> {
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=ferry-replicator"))
        .await
        .map_err(|e| e.to_string())?;
    let running: Vec<&Pod> = list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .collect();
    match running.as_slice() {
        [pod] => Ok(pod.spec.as_ref().unwrap().containers[0]
            .args
            .clone()
            .unwrap_or_default()),
        other => Err(format!("{} running replicator pods", other.len())),
    }
}

on_both_planes!(
    helm_installs_upgrades_and_uninstalls_ferry_in_a_lab_site,
    helm_installs_upgrades_and_uninstalls_ferry_on_a_real_control_plane,
    helm_installs_upgrades_and_uninstalls_ferry,
    needs lab_no_helm, "helm not found (set HELM or put helm on PATH; .ci/install-test-deps.sh installs it)"
);

async fn helm_installs_upgrades_and_uninstalls_ferry(settings: e2e::LabSettings) {
    let helm_bin = helm_binary();
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    e2e::up(&lab.0, "a", &["--bare"], &settings);
    let kubeconfig = lab.0.join("a/kubeconfig");
    let client = client_from(&kubeconfig).await.unwrap();

    // What the chart expects beside it (deploy/README.md): the namespace and the TLS Secret.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let material = CertificateAuthority::generate("helm-test")
        .unwrap()
        .issue("a", &["localhost".into()])
        .unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "ferry-replicator-tls"}, "type": "kubernetes.io/tls",
        "stringData": material.to_secret_data(),
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    let chart = workspace().join("deploy/helm/ferry");
    let chart = chart.to_str().unwrap();
    let mut install = vec![
        "install",
        "ferry",
        chart,
        "--namespace",
        NAMESPACE,
        "--set",
        "site.name=a,site.lease=7s",
    ];
    if settings.control_plane == ferry_lab::control_plane::ControlPlane::Lab {
        // The lab serves no /openapi/v2 document, which helm 3 reads for client-side
        // validation; the API server still validates every object (CRD schemas, 422s).
        install.push("--disable-openapi-validation");
    }
    let notes = helm(&helm_bin, Some(&kubeconfig), &install);
    assert!(
        notes.contains("Ferry is installed in ferry-system for site a."),
        "{notes}"
    );

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    for name in ["ferry-replicator", "ferry-controller"] {
        eventually(&format!("{name} ready after helm install"), || {
            ready_replicas(&deployments, name)
        })
        .await;
    }
    let config = Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE)
        .get("ferry-site")
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(config.data).unwrap(),
        json!({"site": "a", "lease": "7s"})
    );
    // The CRDs come from the chart's crds/ directory, installed before the templates.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "sites.ferry.dev",
        "drpairs.ferry.dev",
        "migrations.ferry.dev",
    ] {
        let crd = crds.get(name).await.unwrap();
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} not Established");
    }
    let listed = helm(&helm_bin, Some(&kubeconfig), &["list", "-n", NAMESPACE]);
    assert!(listed.contains("deployed"), "{listed}");

    // An upgrade changes the replicator's arguments (a strategic merge patch of the
    // Deployment): a new pod runs with them and is ready.
    let generation = deployments
        .get("ferry-replicator")
        .await
        .unwrap()
        .metadata
        .generation;
    let mut upgrade = install.clone();
    upgrade[0] = "upgrade";
    upgrade[6] = "site.name=a,site.lease=7s,replicator.retain=5";
    helm(&helm_bin, Some(&kubeconfig), &upgrade);
    let upgraded = eventually("ferry-replicator ready after helm upgrade", || async {
        let d = ready_replicas(&deployments, "ferry-replicator").await?;
        (d.metadata.generation > generation)
            .then_some(d)
            .ok_or_else(|| "generation unchanged".to_string())
    })
    .await;
    let container = &upgraded.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!(
        container.args.as_deref(),
        Some(&["serve".to_string(), "--retain=5".to_string()][..])
    );
    eventually("the replicator pod running with --retain=5", || async {
        let args = replicator_args(&pods).await?;
        (args == ["serve", "--retain=5"])
            .then_some(())
            .ok_or(format!("{args:?}"))
    })
    .await;

    // Uninstall removes the components, and the kubelet stops their processes.
    helm(
        &helm_bin,
        Some(&kubeconfig),
        &["uninstall", "ferry", "--namespace", NAMESPACE],
    );
    eventually("no Ferry pods after helm uninstall", || async {
        let left = pods
            .list(&ListParams::default().labels("app.kubernetes.io/part-of=ferry"))
            .await
            .map_err(|e| e.to_string())?;
        let remaining = deployments
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        (left.items.is_empty() && remaining.items.is_empty())
            .then_some(())
            .ok_or(format!(
                "{} deployments, pods (name, phase, deletionTimestamp): {:?}",
                remaining.items.len(),
                left.items
                    .iter()
                    .map(|p| (
                        p.metadata.name.clone(),
                        p.status.as_ref().and_then(|s| s.phase.clone()),
                        p.metadata.deletion_timestamp.clone()
                    ))
                    .collect::<Vec<_>>()
            ))
    })
    .await;
}
