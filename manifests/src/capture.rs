//! Reads an application's objects from the source cluster: everything the DRPair's selector
//! matches in its namespace, minus what must not be shipped, plus the PVCs its workloads use.

use std::collections::{BTreeSet, HashSet};

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DynamicObject, ListParams};
use kube::discovery::{verbs, ApiResource, Discovery, Scope};
use serde_json::Value;
use tracing::{debug, warn};

use super::object::{is, pod_template_path, str_at, value_at, ObjectKey};
use super::transform::ORIGINAL_REPLICAS_ANNOTATION;

/// API groups capture does not even discover: nothing in them is shipped, and
/// `metrics.k8s.io` is an aggregated API whose outage (metrics-server down) would otherwise
/// fail discovery, and with it the capture.
pub const UNDISCOVERED_GROUPS: [&str; 2] = ["metrics.k8s.io", "ferry.dev"];

/// Objects requested per list call; larger collections are read page by page with `continue`.
pub const LIST_PAGE_SIZE: u32 = 500;

/// An application as captured from the source cluster, before [`sanitise`](super::sanitise).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CapturedApp {
    /// Full objects as the API server returned them (`apiVersion` and `kind` always set),
    /// sorted by group, kind, namespace and name ([`ObjectKey`] order), each object once.
    pub objects: Vec<Value>,
    /// Names of the PersistentVolumeClaims among `objects`, whose data the replicator copies:
    /// sorted, without duplicates.
    pub pvcs: Vec<String>,
}

/// A `LabelSelector` that cannot be turned into a label-selector query (the same rules the
/// API server's validation applies to `matchExpressions`).
#[derive(Debug, thiserror::Error)]
pub enum SelectorError {
    /// `In` or `NotIn` without values.
    #[error("matchExpressions key {key:?}: operator {operator} needs values")]
    MissingValues {
        /// The requirement's key.
        key: String,
        /// `In` or `NotIn`.
        operator: String,
    },
    /// `Exists` or `DoesNotExist` with values.
    #[error("matchExpressions key {key:?}: operator {operator} takes no values")]
    UnexpectedValues {
        /// The requirement's key.
        key: String,
        /// `Exists` or `DoesNotExist`.
        operator: String,
    },
    /// An operator other than `In`, `NotIn`, `Exists`, `DoesNotExist`.
    #[error("matchExpressions key {key:?}: unknown operator {operator:?}")]
    UnknownOperator {
        /// The requirement's key.
        key: String,
        /// The operator as given.
        operator: String,
    },
}

/// Errors capturing an application. Each names the step, and the resource when one failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The DRPair's selector is not a valid label selector.
    #[error("spec.selector is invalid")]
    Selector(#[from] SelectorError),
    /// API discovery failed (`/api`, `/apis` and each group version).
    #[error("discovering the API server's resources")]
    Discovery(#[source] kube::Error),
    /// Listing one resource failed (including a `410 Gone` when a paginated list outlived its
    /// `continue` token: capture again).
    #[error("listing {resource} in namespace {namespace}")]
    List {
        /// `plural.group/version` (`deployments.apps/v1`, `configmaps/v1` for core).
        resource: String,
        /// The namespace listed.
        namespace: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// An object the API returned could not be re-encoded as JSON.
    #[error("encoding a {resource} object as JSON")]
    Encode {
        /// `plural.group/version`.
        resource: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

impl CaptureError {
    /// Stable, low-cardinality label for metrics and Events.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Selector(_) => "invalid_selector",
            Self::Discovery(_) => "discovery",
            Self::List { .. } => "list",
            Self::Encode { .. } => "encode",
        }
    }
}

/// Turns a metav1 `LabelSelector` into the query syntax of the `labelSelector` list parameter
/// (Kubernetes docs, "Labels and Selectors"): `matchLabels` as `key=value`, then
/// `matchExpressions` as `key in (a,b)`, `key notin (a,b)`, `key`, `!key`; terms joined by
/// commas (AND). An empty selector gives `""`, which matches every object, as the API
/// conventions define for an empty `LabelSelector`.
///
/// # Errors
/// [`SelectorError`] for an unknown operator, `In`/`NotIn` without values, or
/// `Exists`/`DoesNotExist` with values.
pub fn label_selector_query(selector: &LabelSelector) -> Result<String, SelectorError> {
    let mut terms: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for requirement in selector.match_expressions.iter().flatten() {
        let key = &requirement.key;
        let values = requirement.values.as_deref().unwrap_or_default();
        let operator = requirement.operator.as_str();
        let term = match operator {
            "In" | "NotIn" => {
                if values.is_empty() {
                    return Err(SelectorError::MissingValues {
                        key: key.clone(),
                        operator: operator.into(),
                    });
                }
                let word = if operator == "In" { "in" } else { "notin" };
                format!("{key} {word} ({})", values.join(","))
            }
            "Exists" | "DoesNotExist" => {
                if !values.is_empty() {
                    return Err(SelectorError::UnexpectedValues {
                        key: key.clone(),
                        operator: operator.into(),
                    });
                }
                if operator == "Exists" {
                    key.clone()
                } else {
                    format!("!{key}")
                }
            }
            _ => {
                return Err(SelectorError::UnknownOperator {
                    key: key.clone(),
                    operator: operator.into(),
                })
            }
        };
        terms.push(term);
    }
    Ok(terms.join(","))
}

/// Captures the manifests of the application `selector` picks in `namespace`.
///
/// 1. **Discovery** with [`Discovery::run`] (one request per group version; works against
///    servers without aggregated discovery), skipping [`UNDISCOVERED_GROUPS`]. Every
///    namespaced resource that supports `list` is read, each kind at its most stable served
///    version (`resources_by_stability`, so kinds served only in a non-preferred version are
///    not missed).
/// 2. **List** each resource in `namespace` with the selector as `labelSelector`
///    ([`label_selector_query`]), [`LIST_PAGE_SIZE`] objects per page.
/// 3. **Skip** what Ferry must not ship (see [`ships_resource`] and [`ships_object`]): state
///    the destination rebuilds itself (events, endpoints, endpoint slices, leases, metrics),
///    Ferry's own objects and the snapshots it takes, pods, ReplicaSets and
///    ControllerRevisions that a controller owns, and service-account token Secrets.
/// 4. **Add the claims the app uses**, labelled or not: every `persistentVolumeClaim.claimName`
///    in the pod templates of captured Deployments, StatefulSets, DaemonSets, ReplicaSets,
///    Jobs, CronJobs and ReplicationControllers and in captured (bare) Pods, and the claims a
///    StatefulSet made from its `volumeClaimTemplates`, `<template>-<set>-<ordinal>`, for each
///    ordinal from `spec.ordinals.start` (default 0) below start plus its replica count (the
///    larger of `spec.replicas`, default 1, and [`ORIGINAL_REPLICAS_ANNOTATION`] when the set
///    was quiesced), that exists. A referenced claim that does not exist is left out and
///    logged. Claims of generic ephemeral volumes belong to their pod and are not shipped.
///
/// Each resource is read at its own point in time: the result is not an atomic snapshot of
/// the namespace (no Kubernetes API offers one); quiesce the app first when that matters.
///
/// # Errors
/// [`CaptureError::Selector`] before any request; [`CaptureError::Discovery`];
/// [`CaptureError::List`] naming the resource whose list failed; [`CaptureError::Encode`].
/// Nothing is returned on error.
#[tracing::instrument(name = "capture", skip(client, selector))]
pub async fn capture(
    client: &kube::Client,
    namespace: &str,
    selector: &LabelSelector,
) -> Result<CapturedApp, CaptureError> {
    let query = label_selector_query(selector)?;
    let discovery = Discovery::new(client.clone())
        .exclude(&UNDISCOVERED_GROUPS)
        .run()
        .await
        .map_err(CaptureError::Discovery)?;

    let mut objects = Vec::new();
    let mut seen_uids = HashSet::new();
    for group in discovery.groups() {
        for (resource, caps) in group.resources_by_stability() {
            if caps.scope != Scope::Namespaced
                || !caps.supports_operation(verbs::LIST)
                || !ships_resource(&resource)
            {
                continue;
            }
            let listed = list_all(client, namespace, &resource, &query).await?;
            debug!(resource = %resource_name(&resource), count = listed.len(), "listed");
            for object in listed {
                // A kind served by two groups (events, or `extensions` on old servers) is
                // listed twice; keep it once.
                let uid = str_at(&object["metadata"], "uid");
                if ships_object(&object) && (uid.is_empty() || seen_uids.insert(uid.to_string())) {
                    objects.push(object);
                }
            }
        }
    }

    let used = ClaimsUsed::by(&objects);
    let captured: BTreeSet<String> = claim_names(&objects).collect();
    if used.needs_lookup(&captured) {
        let pvc_resource = ApiResource::erase::<PersistentVolumeClaim>(&());
        let existing = list_all(client, namespace, &pvc_resource, "").await?;
        let names: HashSet<&str> = existing
            .iter()
            .map(|c| str_at(&c["metadata"], "name"))
            .collect();
        for missing in used.named.iter().filter(|n| !names.contains(n.as_str())) {
            warn!(claim = %missing, "a captured workload uses a claim that does not exist");
        }
        for claim in existing {
            let name = str_at(&claim["metadata"], "name");
            if !captured.contains(name) && used.includes(name) {
                objects.push(claim);
            }
        }
    }

    objects.sort_by_cached_key(ObjectKey::of);
    let pvcs: BTreeSet<String> = claim_names(&objects).collect();
    Ok(CapturedApp {
        objects,
        pvcs: pvcs.into_iter().collect(),
    })
}

/// Whether objects of `resource` may be shipped at all. `false` for:
///
/// - `events` (core and `events.k8s.io`), `endpoints`, `endpointslices` (`discovery.k8s.io`),
///   `leases` (`coordination.k8s.io`), and everything in `metrics.k8s.io`: records and derived
///   state the destination's own controllers and components produce;
/// - `volumesnapshots` and `volumesnapshotcontents` (`snapshot.storage.k8s.io`): point-in-time
///   copies on the source's storage, meaningless at the destination (and Ferry's capture
///   takes its own);
/// - every resource of group `ferry.dev` and its subgroups: Ferry's own state, which each site
///   keeps for itself.
#[must_use]
pub fn ships_resource(resource: &ApiResource) -> bool {
    let group = resource.group.as_str();
    let never = matches!(
        (group, resource.plural.as_str()),
        ("" | "events.k8s.io", "events")
            | ("", "endpoints")
            | ("discovery.k8s.io", "endpointslices")
            | ("coordination.k8s.io", "leases")
            | (
                "snapshot.storage.k8s.io",
                "volumesnapshots" | "volumesnapshotcontents"
            )
    );
    !(never || group == "metrics.k8s.io" || group == "ferry.dev" || group.ends_with(".ferry.dev"))
}

/// Whether one listed object may be shipped. `false` for Pods, ReplicaSets and
/// ControllerRevisions with an owner reference marked `controller: true` (their controller,
/// shipped instead, creates them again), and for Secrets of type
/// `kubernetes.io/service-account-token` (the destination's token controller issues its own;
/// the source's token would not verify there).
#[must_use]
pub fn ships_object(object: &Value) -> bool {
    let controlled = || {
        object["metadata"]["ownerReferences"]
            .as_array()
            .is_some_and(|owners| owners.iter().any(|o| o["controller"] == true))
    };
    if is(object, "", "Pod")
        || is(object, "apps", "ReplicaSet")
        || is(object, "apps", "ControllerRevision")
    {
        return !controlled();
    }
    if is(object, "", "Secret") {
        return str_at(object, "type") != "kubernetes.io/service-account-token";
    }
    true
}

fn resource_name(resource: &ApiResource) -> String {
    if resource.group.is_empty() {
        format!("{}/{}", resource.plural, resource.version)
    } else {
        format!(
            "{}.{}/{}",
            resource.plural, resource.group, resource.version
        )
    }
}

/// Lists every object of `resource` in `namespace` matching `labels` (`""`: all), page by page.
async fn list_all(
    client: &kube::Client,
    namespace: &str,
    resource: &ApiResource,
    labels: &str,
) -> Result<Vec<Value>, CaptureError> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, resource);
    let mut params = ListParams::default().limit(LIST_PAGE_SIZE);
    if !labels.is_empty() {
        params = params.labels(labels);
    }
    let mut out = Vec::new();
    loop {
        let page = api
            .list(&params)
            .await
            .map_err(|source| CaptureError::List {
                resource: resource_name(resource),
                namespace: namespace.to_string(),
                source,
            })?;
        for item in page.items {
            let mut object = serde_json::to_value(item).map_err(|source| CaptureError::Encode {
                resource: resource_name(resource),
                source,
            })?;
            // Items of a list of built-in kinds come without their type; put it back.
            object["apiVersion"] = resource.api_version.clone().into();
            object["kind"] = resource.kind.clone().into();
            out.push(object);
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(out),
        }
    }
}

/// Names of the PersistentVolumeClaims among `objects`.
fn claim_names(objects: &[Value]) -> impl Iterator<Item = String> + '_ {
    objects
        .iter()
        .filter(|o| is(o, "", "PersistentVolumeClaim"))
        .map(|o| str_at(&o["metadata"], "name").to_string())
}

/// The claims captured workloads use: named ones, and StatefulSet claim-template families.
#[derive(Debug, Default, PartialEq)]
struct ClaimsUsed {
    /// `claimName`s referenced by pod specs.
    named: BTreeSet<String>,
    /// Per StatefulSet claim template: `<template>-<set>-` and the ordinal range in use.
    templated: Vec<(String, std::ops::Range<u64>)>,
}

impl ClaimsUsed {
    fn by(objects: &[Value]) -> Self {
        let mut used = Self::default();
        for object in objects {
            let pod_spec = if is(object, "", "Pod") {
                object.get("spec")
            } else {
                pod_template_path(object)
                    .and_then(|path| value_at(object, path))
                    .and_then(|template| template.get("spec"))
            };
            let volumes = pod_spec
                .and_then(|spec| spec["volumes"].as_array())
                .into_iter()
                .flatten();
            for volume in volumes {
                let claim = str_at(&volume["persistentVolumeClaim"], "claimName");
                if !claim.is_empty() {
                    used.named.insert(claim.to_string());
                }
            }
            if is(object, "apps", "StatefulSet") {
                let set = str_at(&object["metadata"], "name");
                let spec = &object["spec"];
                let replicas = spec["replicas"].as_u64().unwrap_or(1);
                let original = object["metadata"]["annotations"][ORIGINAL_REPLICAS_ANNOTATION]
                    .as_str()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                let start = spec["ordinals"]["start"].as_u64().unwrap_or(0);
                let ordinals = start..start.saturating_add(replicas.max(original));
                for template in spec["volumeClaimTemplates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let name = str_at(&template["metadata"], "name");
                    used.templated
                        .push((format!("{name}-{set}-"), ordinals.clone()));
                }
            }
        }
        used
    }

    /// Whether the namespace's claims must be listed to resolve what is used.
    fn needs_lookup(&self, captured: &BTreeSet<String>) -> bool {
        !self.templated.is_empty() || !self.named.is_subset(captured)
    }

    /// Whether claim `name` is used.
    fn includes(&self, name: &str) -> bool {
        self.named.contains(name)
            || self.templated.iter().any(|(prefix, ordinals)| {
                name.strip_prefix(prefix.as_str())
                    .and_then(|ordinal| {
                        // Only the canonical spelling: "pgdata-db-01" is not ordinal 1's claim.
                        let n = ordinal.parse::<u64>().ok()?;
                        (n.to_string() == ordinal).then_some(n)
                    })
                    .is_some_and(|n| ordinals.contains(&n))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use serde_json::json;

    fn requirement(key: &str, operator: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: values.map(|v| v.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn selector_queries() {
        let labels = |pairs: &[(&str, &str)]| {
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let cases = [
            (LabelSelector::default(), ""),
            (
                LabelSelector {
                    match_labels: labels(&[("tier", "web"), ("app", "shop")]),
                    match_expressions: None,
                },
                "app=shop,tier=web",
            ),
            (
                LabelSelector {
                    match_labels: labels(&[("app", "shop")]),
                    match_expressions: Some(vec![
                        requirement("env", "In", Some(&["prod", "staging"])),
                        requirement("canary", "NotIn", Some(&["true"])),
                        requirement("team", "Exists", None),
                        requirement("legacy", "DoesNotExist", Some(&[])),
                    ]),
                },
                "app=shop,env in (prod,staging),canary notin (true),team,!legacy",
            ),
        ];
        for (selector, want) in cases {
            assert_eq!(label_selector_query(&selector).unwrap(), want);
        }

        let bad = [
            (requirement("env", "In", None), "needs values"),
            (requirement("env", "NotIn", Some(&[])), "needs values"),
            (
                requirement("env", "Exists", Some(&["x"])),
                "takes no values",
            ),
            (requirement("env", "Gt", Some(&["1"])), "unknown operator"),
        ];
        for (requirement, want) in bad {
            let selector = LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![requirement]),
            };
            let err = label_selector_query(&selector).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    fn resource(group: &str, plural: &str) -> ApiResource {
        ApiResource {
            group: group.into(),
            version: "v1".into(),
            api_version: if group.is_empty() {
                "v1".into()
            } else {
                format!("{group}/v1")
            },
            kind: "Whatever".into(),
            plural: plural.into(),
        }
    }

    #[test]
    fn resources_ferry_never_ships() {
        let cases = [
            ("", "events", false),
            ("events.k8s.io", "events", false),
            ("", "endpoints", false),
            ("discovery.k8s.io", "endpointslices", false),
            ("coordination.k8s.io", "leases", false),
            ("snapshot.storage.k8s.io", "volumesnapshots", false),
            ("snapshot.storage.k8s.io", "volumesnapshotcontents", false),
            ("ferry.dev", "drpairs", false),
            ("lab.ferry.dev", "anything", false),
            ("metrics.k8s.io", "pods", false),
            ("", "pods", true),
            ("", "configmaps", true),
            ("apps", "deployments", true),
            ("snapshot.storage.k8s.io", "volumesnapshotclasses", true),
            ("notferry.dev", "things", true),
            ("example.com", "events", true),
        ];
        for (group, plural, want) in cases {
            assert_eq!(
                ships_resource(&resource(group, plural)),
                want,
                "{plural}.{group}"
            );
        }
    }

    #[test]
    fn objects_ferry_never_ships() {
        let owned_by = |controller: bool| {
            json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "u",
                    "controller": controller}])
        };
        let cases = [
            (
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1-x", "ownerReferences": owned_by(true)}}),
                false,
            ),
            (
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "ownerReferences": owned_by(false)}}),
                true,
            ),
            (
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "debug"}}),
                true,
            ),
            (
                json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "web-1", "ownerReferences": owned_by(true)}}),
                false,
            ),
            (
                json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "bare"}}),
                true,
            ),
            (
                json!({"apiVersion": "apps/v1", "kind": "ControllerRevision", "metadata": {"name": "db-1", "ownerReferences": owned_by(true)}}),
                false,
            ),
            (
                json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token", "metadata": {"name": "t"}}),
                false,
            ),
            (
                json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": "creds"}}),
                true,
            ),
            // Owned ConfigMaps are shipped; sanitise decides what happens to the reference.
            (
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "ownerReferences": owned_by(true)}}),
                true,
            ),
        ];
        for (object, want) in cases {
            assert_eq!(ships_object(&object), want, "{object}");
        }
    }

    #[test]
    fn claims_used_by_workloads_and_statefulsets() {
        let with_claim = |claim: &str| {
            json!({"spec": {"volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}},
                                        {"name": "tmp", "emptyDir": {}}]}})
        };
        let objects = vec![
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                   "spec": {"template": with_claim("data")}}),
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"},
                   "spec": {"template": with_claim("agent-cache")}}),
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "migrate"},
                   "spec": {"template": with_claim("scratch")}}),
            json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "report"},
                   "spec": {"jobTemplate": {"spec": {"template": with_claim("reports")}}}}),
            {
                let mut pod = with_claim("debug-data");
                pod["apiVersion"] = json!("v1");
                pod["kind"] = json!("Pod");
                pod["metadata"] = json!({"name": "debug"});
                pod
            },
            // Quiesced to 0 with 2 recorded, ordinals start at 1: ordinals 1 and 2.
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
                   "metadata": {"name": "db", "annotations": {ORIGINAL_REPLICAS_ANNOTATION: "2"}},
                   "spec": {"replicas": 0, "ordinals": {"start": 1},
                            "template": with_claim("shared"),
                            "volumeClaimTemplates": [{"metadata": {"name": "pgdata"}}]}}),
            // A custom resource with a pod-spec-like shape is not a workload.
            json!({"apiVersion": "example.com/v1", "kind": "Deployment", "metadata": {"name": "x"},
                   "spec": {"template": with_claim("not-this")}}),
        ];
        let used = ClaimsUsed::by(&objects);
        assert_eq!(
            used.named.iter().map(String::as_str).collect::<Vec<_>>(),
            [
                "agent-cache",
                "data",
                "debug-data",
                "reports",
                "scratch",
                "shared"
            ]
        );
        let cases = [
            ("pgdata-db-0", false),
            ("pgdata-db-1", true),
            ("pgdata-db-2", true),
            ("pgdata-db-3", false),
            ("pgdata-db-01", false),
            ("pgdata-db-x", false),
            ("pgdata-dbx-1", false),
            ("data", true),
            ("not-this", false),
        ];
        for (name, want) in cases {
            assert_eq!(used.includes(name), want, "{name}");
        }
        let captured: BTreeSet<String> = used.named.clone();
        assert!(
            used.needs_lookup(&captured),
            "templated claims need a lookup"
        );
        let plain = ClaimsUsed::by(&objects[..1]);
        assert!(!plain.needs_lookup(&BTreeSet::from(["data".to_string()])));
        assert!(plain.needs_lookup(&BTreeSet::new()));
    }

    #[test]
    fn statefulset_without_replicas_uses_ordinal_zero() {
        let used = ClaimsUsed::by(&[json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
            "spec": {"volumeClaimTemplates": [{"metadata": {"name": "pgdata"}}]}
        })]);
        assert!(used.includes("pgdata-db-0"));
        assert!(!used.includes("pgdata-db-1"));
    }
}
