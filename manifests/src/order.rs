//! Groups objects into waves to create at the destination, dependencies first.

use serde_json::Value;

use super::object::{group_of, kind_of, ObjectKey};

/// A wave of [`instantiation_order`], in creation order. Adapted from Velero's restore
/// resource priorities (Velero docs, "Restore Reference", "Restore order"; velero
/// `pkg/cmd/server` `defaultRestorePriorities`): what others refer to is created before what
/// refers to it. Unlike Velero, which restores Pods and ReplicaSets early so that it can
/// restore their volumes, all workloads come last here: Ferry's volumes are already in place
/// as PVCs, and pods should start only once everything they consume exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Wave {
    /// `Namespace`.
    Namespaces,
    /// `CustomResourceDefinition` (apiextensions.k8s.io): custom resources need them.
    CustomResourceDefinitions,
    /// `StorageClass` (storage.k8s.io): claims are provisioned from them.
    StorageClasses,
    /// `PersistentVolume`.
    PersistentVolumes,
    /// `PersistentVolumeClaim`: bound before pods mount them.
    PersistentVolumeClaims,
    /// `ServiceAccount`: pods run as them, token Secrets refer to them.
    ServiceAccounts,
    /// `Secret`.
    Secrets,
    /// `ConfigMap`.
    ConfigMaps,
    /// `Role`, `RoleBinding`, `ClusterRole`, `ClusterRoleBinding` (rbac.authorization.k8s.io).
    Rbac,
    /// `Service`: before workloads, so pods see their environment variables.
    Services,
    /// Every other built-in kind (group `""`, `apps`, `batch`, `autoscaling`, `policy`,
    /// `extensions`, or ending in `.k8s.io`): LimitRanges, ResourceQuotas, Ingresses,
    /// NetworkPolicies, PodDisruptionBudgets, HorizontalPodAutoscalers, ...
    OtherBuiltIns,
    /// Custom resources: kinds of any other group, after their CRDs and the built-ins an
    /// operator's objects usually refer to.
    CustomResources,
    /// Workloads, last: `Deployment`, `StatefulSet`, `DaemonSet`, `ReplicaSet`, `Job`,
    /// `CronJob`, `Pod`, `ReplicationController`.
    Workloads,
}

impl Wave {
    /// The wave an object of `kind` in API `group` (`""` for core) belongs to.
    #[must_use]
    pub fn of(group: &str, kind: &str) -> Self {
        match (group, kind) {
            ("", "Namespace") => Self::Namespaces,
            ("apiextensions.k8s.io", "CustomResourceDefinition") => Self::CustomResourceDefinitions,
            ("storage.k8s.io", "StorageClass") => Self::StorageClasses,
            ("", "PersistentVolume") => Self::PersistentVolumes,
            ("", "PersistentVolumeClaim") => Self::PersistentVolumeClaims,
            ("", "ServiceAccount") => Self::ServiceAccounts,
            ("", "Secret") => Self::Secrets,
            ("", "ConfigMap") => Self::ConfigMaps,
            (
                "rbac.authorization.k8s.io",
                "Role" | "RoleBinding" | "ClusterRole" | "ClusterRoleBinding",
            ) => Self::Rbac,
            ("", "Service") => Self::Services,
            ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
            | ("batch", "Job" | "CronJob")
            | ("", "Pod" | "ReplicationController") => Self::Workloads,
            (group, _) if is_built_in_group(group) => Self::OtherBuiltIns,
            _ => Self::CustomResources,
        }
    }

    /// The wave `object` belongs to, from its `apiVersion` and `kind`.
    #[must_use]
    pub fn of_object(object: &Value) -> Self {
        Self::of(group_of(object), kind_of(object))
    }
}

/// Whether `group` is one Kubernetes itself serves: the core group, the legacy groups without
/// a domain, and the `*.k8s.io` groups reserved for Kubernetes by its API conventions.
fn is_built_in_group(group: &str) -> bool {
    matches!(
        group,
        "" | "apps" | "batch" | "autoscaling" | "policy" | "extensions"
    ) || group == "k8s.io"
        || group.ends_with(".k8s.io")
}

/// Splits objects into waves to create one after the other at the destination: every object
/// of a wave can be created once the previous waves exist (see [`Wave`] for the order and its
/// source, Velero's restore priorities). Empty waves are left out, so the result has between
/// zero and 13 waves, in [`Wave`] order.
///
/// Within a wave objects are sorted by group, kind, namespace and name ([`ObjectKey`]'s
/// order), so the same set always gives the same waves whatever order it came in. Objects
/// are neither changed nor dropped.
#[must_use]
pub fn instantiation_order(objects: Vec<Value>) -> Vec<Vec<Value>> {
    let mut keyed: Vec<((Wave, ObjectKey), Value)> = objects
        .into_iter()
        .map(|o| ((Wave::of_object(&o), ObjectKey::of(&o)), o))
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut waves: Vec<Vec<Value>> = Vec::new();
    let mut current = None;
    for ((wave, _), object) in keyed {
        if current != Some(wave) {
            waves.push(Vec::new());
            current = Some(wave);
        }
        waves.last_mut().expect("pushed above").push(object);
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(api_version: &str, kind: &str, name: &str) -> Value {
        json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": "shop"}})
    }

    fn names(waves: &[Vec<Value>]) -> Vec<Vec<String>> {
        waves
            .iter()
            .map(|w| w.iter().map(|o| ObjectKey::of(o).to_string()).collect())
            .collect()
    }

    #[test]
    fn waves_follow_restore_priorities() {
        let objects = vec![
            obj("batch/v1", "CronJob", "report"),
            obj("apps/v1", "StatefulSet", "db"),
            obj("apps/v1", "Deployment", "web"),
            obj("v1", "Pod", "debug"),
            obj("shop.example.com/v1", "Catalog", "main"),
            obj("networking.k8s.io/v1", "Ingress", "web"),
            obj("v1", "Service", "web"),
            obj("v1", "Service", "db"),
            obj("rbac.authorization.k8s.io/v1", "RoleBinding", "reader"),
            obj("rbac.authorization.k8s.io/v1", "Role", "reader"),
            obj("v1", "ConfigMap", "settings"),
            obj("v1", "Secret", "creds"),
            obj("v1", "ServiceAccount", "shop"),
            obj("v1", "PersistentVolumeClaim", "pgdata-db-0"),
            obj("v1", "PersistentVolumeClaim", "data"),
            obj("v1", "PersistentVolume", "pv-1"),
            obj("storage.k8s.io/v1", "StorageClass", "fast"),
            obj(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                "catalogs.shop.example.com",
            ),
            obj("v1", "Namespace", "shop"),
        ];
        let waves = instantiation_order(objects.clone());
        assert_eq!(
            names(&waves),
            vec![
                vec!["Namespace shop/shop"],
                vec![
                    "CustomResourceDefinition.apiextensions.k8s.io shop/catalogs.shop.example.com"
                ],
                vec!["StorageClass.storage.k8s.io shop/fast"],
                vec!["PersistentVolume shop/pv-1"],
                vec![
                    "PersistentVolumeClaim shop/data",
                    "PersistentVolumeClaim shop/pgdata-db-0"
                ],
                vec!["ServiceAccount shop/shop"],
                vec!["Secret shop/creds"],
                vec!["ConfigMap shop/settings"],
                vec![
                    "Role.rbac.authorization.k8s.io shop/reader",
                    "RoleBinding.rbac.authorization.k8s.io shop/reader"
                ],
                vec!["Service shop/db", "Service shop/web"],
                vec!["Ingress.networking.k8s.io shop/web"],
                vec!["Catalog.shop.example.com shop/main"],
                vec![
                    "Pod shop/debug",
                    "Deployment.apps shop/web",
                    "StatefulSet.apps shop/db",
                    "CronJob.batch shop/report"
                ],
            ]
        );
        // Deterministic whatever the input order; nothing lost.
        let mut reversed = objects.clone();
        reversed.reverse();
        assert_eq!(instantiation_order(reversed), waves);
        assert_eq!(waves.iter().map(Vec::len).sum::<usize>(), objects.len());
    }

    #[test]
    fn classification_table() {
        let cases = [
            ("", "LimitRange", Wave::OtherBuiltIns),
            ("policy", "PodDisruptionBudget", Wave::OtherBuiltIns),
            (
                "autoscaling",
                "HorizontalPodAutoscaler",
                Wave::OtherBuiltIns,
            ),
            (
                "gateway.networking.k8s.io",
                "HTTPRoute",
                Wave::OtherBuiltIns,
            ),
            ("apps", "DaemonSet", Wave::Workloads),
            ("", "ReplicationController", Wave::Workloads),
            (
                "monitoring.coreos.com",
                "ServiceMonitor",
                Wave::CustomResources,
            ),
            // A kind named like a built-in in another group is a custom resource.
            ("example.com", "Deployment", Wave::CustomResources),
            ("example.com", "Secret", Wave::CustomResources),
        ];
        for (group, kind, want) in cases {
            assert_eq!(Wave::of(group, kind), want, "{kind}.{group}");
        }
    }

    #[test]
    fn no_objects_no_waves() {
        assert!(instantiation_order(Vec::new()).is_empty());
    }
}
