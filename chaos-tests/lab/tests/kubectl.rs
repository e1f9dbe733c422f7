//! kubectl against a lab site: apply of a CRD and a CR, `get -l`, server-side apply, scale,
//! delete and api-resources, with the machine's kubectl.
//!
//! Listed as ignored where kubectl is absent; under CI (`CI=true`) its absence fails, since
//! `.ci/install-test-deps.sh` installs it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::Site;

/// Panics with the install hint unless kubectl runs (the tests that need it are listed as
/// ignored then, outside CI: `lab_no_kubectl`).
fn require_kubectl() {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "kubectl not found on PATH (.ci/install-test-deps.sh installs it)"
    );
}

/// Runs kubectl with the site's kubeconfig; panics with stdout and stderr unless it succeeds.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("60")
        .arg("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.lab.ferry.dev
spec:
  group: lab.ferry.dev
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget, shortNames: [gd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1}
"#;

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop, labels: {app: web, tier: front}}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: ferry-lab/sqlite-writer}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop, labels: {app: web}}
data: {mode: fast}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    lab_no_kubectl,
    ignore = "kubectl not found on PATH (.ci/install-test-deps.sh installs it)"
)]
async fn kubectl_drives_a_lab_site() {
    require_kubectl();
    let site = Site::start_open().await;
    let kc = site.kubeconfig.clone();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.to_string_lossy().into_owned()
    };
    let crd = write("crd.yaml", CRD);
    let app = write("app.yaml", APP);
    let cr = write("cr.yaml", "apiVersion: lab.ferry.dev/v1\nkind: Gadget\nmetadata: {name: g1, namespace: shop}\nspec: {size: 3}\n");
    let bad_cr = write("bad.yaml", "apiVersion: lab.ferry.dev/v1\nkind: Gadget\nmetadata: {name: g2, namespace: shop}\nspec: {size: 0}\n");

    // kubectl blocks; run it off the async runtime that serves the site.
    tokio::task::spawn_blocking(move || {
        let resources = kubectl(&kc, &["api-resources"]);
        for kind in [
            "Deployment",
            "VolumeSnapshot",
            "CustomResourceDefinition",
            "Lease",
        ] {
            assert!(
                resources.contains(kind),
                "api-resources lists {kind}:\n{resources}"
            );
        }

        assert!(kubectl(&kc, &["apply", "-f", &crd]).contains("gadgets.lab.ferry.dev created"));
        kubectl(
            &kc,
            &[
                "wait",
                "--for=condition=Established",
                "crd/gadgets.lab.ferry.dev",
                "--timeout=30s",
            ],
        );
        kubectl(&kc, &["apply", "-f", &app]);
        assert!(kubectl(&kc, &["apply", "-f", &cr]).contains("gadget.lab.ferry.dev/g1 created"));
        // The CRD's printer column shows through Table output.
        let gadgets = kubectl(&kc, &["-n", "shop", "get", "gd"]);
        assert!(
            gadgets.contains("SIZE") && gadgets.contains("g1") && gadgets.contains('3'),
            "{gadgets}"
        );

        // Schema validation names the field.
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kc)
            .args(["apply", "-f", &bad_cr])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("spec.size"),
            "invalid CR rejected naming spec.size: {stderr}"
        );

        let selected = kubectl(
            &kc,
            &[
                "-n",
                "shop",
                "get",
                "deploy,cm",
                "-l",
                "app=web,tier=front",
                "-o",
                "name",
            ],
        );
        assert_eq!(
            selected.trim(),
            "deployment.apps/web",
            "only the deployment carries tier=front"
        );

        kubectl(
            &kc,
            &["-n", "shop", "scale", "deploy", "web", "--replicas=4"],
        );
        assert_eq!(
            kubectl(
                &kc,
                &[
                    "-n",
                    "shop",
                    "get",
                    "deploy",
                    "web",
                    "-o",
                    "jsonpath={.spec.replicas}"
                ]
            ),
            "4"
        );
        // The table kubectl prints has the built-in printer's columns.
        let table = kubectl(&kc, &["-n", "shop", "get", "deploy", "web"]);
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
            "{table}"
        );
        let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
        assert!(row[0] == "web" && row[1].ends_with("/4"), "{table}");

        // Server-side apply takes the fields back from the other managers when forced.
        kubectl(
            &kc,
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=lab-test",
                "-f",
                &app,
            ],
        );
        let managers = kubectl(
            &kc,
            &[
                "-n",
                "shop",
                "get",
                "deploy",
                "web",
                "-o",
                "jsonpath={.spec.replicas} {.metadata.managedFields[*].manager}",
            ],
        );
        assert!(
            managers.starts_with("2 ") && managers.contains("lab-test"),
            "{managers}"
        );

        kubectl(&kc, &["-n", "shop", "delete", "deploy", "web"]);
        assert!(kubectl(&kc, &["-n", "shop", "get", "deploy", "-o", "name"])
            .trim()
            .is_empty());
        kubectl(&kc, &["delete", "ns", "shop", "--timeout=30s"]);
        kubectl(&kc, &["delete", "-f", &crd]);
    })
    .await
    .unwrap();
    // Keep the site alive for the whole run.
    tokio::time::sleep(Duration::ZERO).await;
    drop(site);
}

/// `kubectl create <kind>` sends protobuf bodies; the lab's API server reads them for every
/// generator kind and stores what kubectl meant, read back as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    lab_no_kubectl,
    ignore = "kubectl not found on PATH (.ci/install-test-deps.sh installs it)"
)]
async fn kubectl_create_generators_send_protobuf_and_the_lab_stores_what_they_meant() {
    require_kubectl();
    let site = Site::start_open().await;
    let kc = site.kubeconfig.clone();
    tokio::task::spawn_blocking(move || {
        let ns = ["-n", "shop"];
        let create = |args: &[&str]| {
            let mut all = vec!["create"];
            all.extend_from_slice(args);
            let out = kubectl(&kc, &all);
            assert!(out.contains("created"), "kubectl create {args:?}: {out}");
        };
        let get = |args: &[&str], path: &str| {
            let mut all = ns.to_vec();
            all.push("get");
            all.extend_from_slice(args);
            let jsonpath = format!("jsonpath={path}");
            all.extend_from_slice(&["-o", &jsonpath]);
            kubectl(&kc, &all)
        };
        create(&["namespace", "shop"]);
        create(&[
            "-n",
            "shop",
            "deployment",
            "web",
            "--image=ferry-lab/sqlite-writer",
            "--replicas=2",
            "--port=8080",
        ]);
        create(&[
            "-n",
            "shop",
            "configmap",
            "settings",
            "--from-literal=mode=fast",
        ]);
        create(&[
            "-n",
            "shop",
            "secret",
            "generic",
            "creds",
            "--from-literal=password=hunter2",
        ]);
        create(&["-n", "shop", "service", "clusterip", "web", "--tcp=80:8080"]);
        create(&["-n", "shop", "serviceaccount", "robot"]);
        create(&[
            "-n",
            "shop",
            "role",
            "reader",
            "--verb=get,list",
            "--resource=pods",
        ]);
        create(&[
            "-n",
            "shop",
            "rolebinding",
            "robot-reads",
            "--role=reader",
            "--serviceaccount=shop:robot",
        ]);
        create(&[
            "-n",
            "shop",
            "cronjob",
            "nightly",
            "--image=ferry-lab/sqlite-writer",
            "--schedule=0 3 * * *",
            "--",
            "vacuum",
        ]);
        create(&[
            "-n",
            "shop",
            "job",
            "once",
            "--image=ferry-lab/sqlite-writer",
            "--",
            "check",
        ]);
        create(&[
            "clusterrole",
            "shop-viewer",
            "--verb=get",
            "--resource=configmaps",
        ]);

        assert_eq!(
            get(
                &["deploy", "web"],
                "{.spec.replicas} {.spec.selector.matchLabels.app} \
                 {.spec.template.spec.containers[0].image} \
                 {.spec.template.spec.containers[0].ports[0].containerPort}"
            ),
            "2 web ferry-lab/sqlite-writer 8080"
        );
        // kubectl's generators leave the template's creationTimestamp at Go's zero time.
        assert_eq!(
            get(
                &["deploy", "web"],
                "{.spec.template.metadata.creationTimestamp}"
            ),
            ""
        );
        assert_eq!(get(&["cm", "settings"], "{.data.mode}"), "fast");
        // Secret data travels as bytes in protobuf and as base64 in JSON.
        assert_eq!(
            get(&["secret", "creds"], "{.data.password}"),
            "aHVudGVyMg=="
        );
        assert_eq!(
            get(
                &["svc", "web"],
                "{.spec.ports[0].port} {.spec.ports[0].targetPort}"
            ),
            "80 8080"
        );
        assert_eq!(
            get(
                &["role", "reader"],
                "{.rules[0].verbs} {.rules[0].resources}"
            ),
            r#"["get","list"] ["pods"]"#
        );
        assert_eq!(
            get(
                &["rolebinding", "robot-reads"],
                "{.roleRef.kind}/{.roleRef.name} {.subjects[0].kind}/{.subjects[0].name}"
            ),
            "Role/reader ServiceAccount/robot"
        );
        assert_eq!(
            get(
                &["cronjob", "nightly"],
                "{.spec.schedule}|{.spec.jobTemplate.spec.template.spec.containers[0].command}"
            ),
            r#"0 3 * * *|["vacuum"]"#
        );
        assert_eq!(
            kubectl(
                &kc,
                &[
                    "get",
                    "clusterrole",
                    "shop-viewer",
                    "-o",
                    "jsonpath={.rules[0].resources}"
                ]
            ),
            r#"["configmaps"]"#
        );
        assert_eq!(
            get(
                &["job", "once"],
                "{.spec.template.spec.restartPolicy}|{.spec.template.spec.containers[0].command}"
            ),
            r#"Never|["check"]"#
        );
        kubectl(&kc, &["delete", "clusterrole", "shop-viewer"]);
        kubectl(&kc, &["delete", "ns", "shop", "--timeout=30s"]);
    })
    .await
    .unwrap();
    drop(site);
}
