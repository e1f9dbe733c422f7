//! The table of served resources: built-in kinds plus those added by CustomResourceDefinitions.

use std::collections::BTreeMap;
use std::sync::RwLock;

use serde_json::{json, Value};

/// Where a scale subresource reads and writes its fields, as JSON paths like `.spec.replicas`
/// (apiextensions.k8s.io/v1 `CustomResourceSubresourceScale`).
#[derive(Clone, Debug, PartialEq)]
pub struct ScalePaths {
    /// Path of the desired replica count, e.g. `.spec.replicas`.
    pub spec_replicas: String,
    /// Path of the observed replica count, e.g. `.status.replicas`.
    pub status_replicas: String,
    /// Path of the serialised label selector, e.g. `.status.selector`, if any.
    pub label_selector: Option<String>,
}

/// Everything the server needs to know to serve one resource at one group/version.
#[derive(Clone, Debug)]
pub struct ResourceInfo {
    /// API group; empty for the core group.
    pub group: String,
    /// Version, e.g. `v1`.
    pub version: String,
    /// Plural resource name used in URLs, e.g. `deployments`.
    pub plural: String,
    /// Singular name, e.g. `deployment`.
    pub singular: String,
    /// Kind, e.g. `Deployment`.
    pub kind: String,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Short names accepted by kubectl, e.g. `deploy`.
    pub short_names: Vec<String>,
    /// Whether a `/status` subresource exists. When it does, writes to the main resource keep
    /// the stored status, and writes to `/status` change only status.
    pub status_subresource: bool,
    /// The scale subresource, if any.
    pub scale: Option<ScalePaths>,
    /// The version's `openAPIV3Schema`, for custom resources; built-ins are not schema-checked.
    pub schema: Option<Value>,
    /// `additionalPrinterColumns` of a CRD version, used for Table output.
    pub printer_columns: Vec<Value>,
    /// Categories, e.g. `all`.
    pub categories: Vec<String>,
}

impl ResourceInfo {
    /// `group/version`, or just `version` for the core group: the `apiVersion` of objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The storage key of the resource, independent of version: `core/pods`, `apps/deployments`.
    pub fn storage_prefix(&self) -> String {
        let g = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        format!("{g}/{}", self.plural)
    }

    /// The API discovery entries (`APIResource`) for the resource and its subresources.
    pub fn discovery_entries(&self) -> Vec<Value> {
        let mut verbs = vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ];
        if self.plural == "events" || self.plural == "namespaces" {
            verbs.retain(|v| *v != "deletecollection" || self.plural == "events");
        }
        let mut out = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
            "shortNames": self.short_names,
            "categories": self.categories,
            "storageVersionHash": "",
        })];
        if self.status_subresource {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if self.scale.is_some() {
            out.push(json!({
                "name": format!("{}/scale", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

/// A built-in resource row: (group, version, plural, kind, namespaced, short names, status, scale).
type BuiltIn = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    bool,
    &'static [&'static str],
    bool,
    bool,
);

/// The built-in resources the lab serves (a subset of Kubernetes 1.35's).
const BUILT_INS: &[BuiltIn] = &[
    (
        "",
        "v1",
        "namespaces",
        "Namespace",
        false,
        &["ns"],
        true,
        false,
    ),
    (
        "",
        "v1",
        "configmaps",
        "ConfigMap",
        true,
        &["cm"],
        false,
        false,
    ),
    ("", "v1", "secrets", "Secret", true, &[], false, false),
    ("", "v1", "services", "Service", true, &["svc"], true, false),
    (
        "",
        "v1",
        "serviceaccounts",
        "ServiceAccount",
        true,
        &["sa"],
        false,
        false,
    ),
    (
        "",
        "v1",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        true,
        &["pvc"],
        true,
        false,
    ),
    (
        "",
        "v1",
        "persistentvolumes",
        "PersistentVolume",
        false,
        &["pv"],
        true,
        false,
    ),
    ("", "v1", "pods", "Pod", true, &["po"], true, false),
    ("", "v1", "events", "Event", true, &["ev"], false, false),
    (
        "apps",
        "v1",
        "deployments",
        "Deployment",
        true,
        &["deploy"],
        true,
        true,
    ),
    (
        "apps",
        "v1",
        "statefulsets",
        "StatefulSet",
        true,
        &["sts"],
        true,
        true,
    ),
    (
        "apps",
        "v1",
        "daemonsets",
        "DaemonSet",
        true,
        &["ds"],
        true,
        false,
    ),
    (
        "apps",
        "v1",
        "replicasets",
        "ReplicaSet",
        true,
        &["rs"],
        true,
        true,
    ),
    ("batch", "v1", "jobs", "Job", true, &[], true, false),
    (
        "batch",
        "v1",
        "cronjobs",
        "CronJob",
        true,
        &["cj"],
        true,
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "roles",
        "Role",
        true,
        &[],
        false,
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "rolebindings",
        "RoleBinding",
        true,
        &[],
        false,
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "clusterroles",
        "ClusterRole",
        false,
        &[],
        false,
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
        &[],
        false,
        false,
    ),
    (
        "storage.k8s.io",
        "v1",
        "storageclasses",
        "StorageClass",
        false,
        &["sc"],
        false,
        false,
    ),
    (
        "coordination.k8s.io",
        "v1",
        "leases",
        "Lease",
        true,
        &[],
        false,
        false,
    ),
    (
        "networking.k8s.io",
        "v1",
        "networkpolicies",
        "NetworkPolicy",
        true,
        &["netpol"],
        false,
        false,
    ),
    (
        "events.k8s.io",
        "v1",
        "events",
        "Event",
        true,
        &["ev"],
        false,
        false,
    ),
    (
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
        &["crd", "crds"],
        true,
        false,
    ),
    (
        "snapshot.storage.k8s.io",
        "v1",
        "volumesnapshots",
        "VolumeSnapshot",
        true,
        &["vs"],
        true,
        false,
    ),
    (
        "snapshot.storage.k8s.io",
        "v1",
        "volumesnapshotcontents",
        "VolumeSnapshotContent",
        false,
        &["vsc", "vscs"],
        true,
        false,
    ),
    (
        "snapshot.storage.k8s.io",
        "v1",
        "volumesnapshotclasses",
        "VolumeSnapshotClass",
        false,
        &["vsclass", "vsclasses"],
        false,
        false,
    ),
];

/// Kinds that `kubectl get all` lists.
const CATEGORY_ALL: &[&str] = &[
    "pods",
    "services",
    "deployments",
    "statefulsets",
    "daemonsets",
    "replicasets",
    "jobs",
    "cronjobs",
];

/// The set of resources a site serves. Built-ins are fixed; CRDs come and go at run time.
#[derive(Debug)]
pub struct Registry {
    // Keyed by (group, version, plural).
    resources: RwLock<BTreeMap<(String, String, String), ResourceInfo>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// A registry holding the built-in resources only.
    pub fn new() -> Self {
        let mut map = BTreeMap::new();
        for &(group, version, plural, kind, namespaced, short, status, scale) in BUILT_INS {
            let info = ResourceInfo {
                group: group.into(),
                version: version.into(),
                plural: plural.into(),
                singular: kind.to_lowercase(),
                kind: kind.into(),
                namespaced,
                short_names: short.iter().map(|s| s.to_string()).collect(),
                status_subresource: status,
                scale: scale.then(|| ScalePaths {
                    spec_replicas: ".spec.replicas".into(),
                    status_replicas: ".status.replicas".into(),
                    label_selector: Some(".status.selector".into()),
                }),
                schema: None,
                printer_columns: Vec::new(),
                categories: if CATEGORY_ALL.contains(&plural) {
                    vec!["all".into()]
                } else {
                    Vec::new()
                },
            };
            map.insert((group.into(), version.into(), plural.into()), info);
        }
        Self {
            resources: RwLock::new(map),
        }
    }

    /// Looks up a resource by group, version and plural name.
    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<ResourceInfo> {
        let map = self.resources.read().expect("registry lock poisoned");
        map.get(&(group.to_string(), version.to_string(), plural.to_string()))
            .cloned()
    }

    /// Every served resource, sorted by group, version, plural.
    pub fn all(&self) -> Vec<ResourceInfo> {
        self.resources
            .read()
            .expect("registry lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Every served version of a group, preferred (first listed by the CRD or built-in) first.
    pub fn group_versions(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for info in self.all() {
            let versions = out.entry(info.group.clone()).or_default();
            if !versions.contains(&info.version) {
                versions.push(info.version.clone());
            }
        }
        out
    }

    /// Serves the versions of a CustomResourceDefinition (replacing any it served before).
    /// Returns the resources now served. Versions with `served: false` are not served.
    pub fn install_crd(&self, crd: &Value) -> Vec<ResourceInfo> {
        let infos = crd_resources(crd);
        let mut map = self.resources.write().expect("registry lock poisoned");
        let group = crd["spec"]["group"].as_str().unwrap_or_default();
        let plural = crd["spec"]["names"]["plural"].as_str().unwrap_or_default();
        map.retain(|(g, _, p), _| !(g == group && p == plural));
        for info in &infos {
            map.insert(
                (
                    info.group.clone(),
                    info.version.clone(),
                    info.plural.clone(),
                ),
                info.clone(),
            );
        }
        infos
    }

    /// Stops serving the resources of a CustomResourceDefinition.
    pub fn remove_crd(&self, crd: &Value) {
        let group = crd["spec"]["group"].as_str().unwrap_or_default();
        let plural = crd["spec"]["names"]["plural"].as_str().unwrap_or_default();
        let mut map = self.resources.write().expect("registry lock poisoned");
        map.retain(|(g, _, p), _| !(g == group && p == plural));
    }
}

/// Builds the `ResourceInfo` of every served version of a CRD object.
fn crd_resources(crd: &Value) -> Vec<ResourceInfo> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let str_list = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let kind = names["kind"].as_str().unwrap_or_default().to_string();
    let mut out = Vec::new();
    for version in spec["versions"].as_array().into_iter().flatten() {
        if version["served"] == Value::Bool(false) {
            continue;
        }
        let sub = &version["subresources"];
        let scale = sub
            .get("scale")
            .filter(|s| s.is_object())
            .map(|s| ScalePaths {
                spec_replicas: s["specReplicasPath"]
                    .as_str()
                    .unwrap_or(".spec.replicas")
                    .into(),
                status_replicas: s["statusReplicasPath"]
                    .as_str()
                    .unwrap_or(".status.replicas")
                    .into(),
                label_selector: s["labelSelectorPath"].as_str().map(String::from),
            });
        out.push(ResourceInfo {
            group: spec["group"].as_str().unwrap_or_default().into(),
            version: version["name"].as_str().unwrap_or_default().into(),
            plural: names["plural"].as_str().unwrap_or_default().into(),
            singular: names["singular"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| kind.to_lowercase()),
            kind: kind.clone(),
            namespaced: spec["scope"].as_str() != Some("Cluster"),
            short_names: str_list(&names["shortNames"]),
            status_subresource: sub.get("status").is_some_and(|s| s.is_object()),
            scale,
            schema: version["schema"].get("openAPIV3Schema").cloned(),
            printer_columns: version["additionalPrinterColumns"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            categories: str_list(&names["categories"]),
        });
    }
    out
}
