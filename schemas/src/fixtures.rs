//! Test-only builders for Ferry's CRs (compiled for tests or with the `fixtures` feature).
//!
//! Start from a valid object and change one thing:
//! `drpair("db", "shop").with_rpo("5s").build()` is a pair whose only fault is
//! its RPO. Defaults: sites [`SITE_A`] and [`SITE_B`], selector `app=<name>`,
//! RPO `1m`, everything else at its CRD default.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::drpair::{
    DRPair, DRPairSpec, DRPairStatus, FailoverMode, Hook, Hooks, JsonPatchOperation, PatchOp,
    ReplicaPolicy, ResourcePatch, StandbyMode,
};
use crate::migration::{Migration, MigrationSpec, MigrationStatus, MigrationType};
use crate::site::{SecretRef, Site, SiteSpec};

/// Name of the default primary site.
pub const SITE_A: &str = "site-a";
/// Name of the default secondary site.
pub const SITE_B: &str = "site-b";

/// The sites the builders use, as `known_sites` for `validate`.
#[must_use]
pub fn known_sites() -> Vec<String> {
    vec![SITE_A.to_owned(), SITE_B.to_owned()]
}

/// Builds a [`DRPair`]; see the module docs for the defaults.
#[derive(Clone, Debug)]
#[must_use]
pub struct DRPairBuilder {
    pair: DRPair,
}

/// A valid `DRPair` called `name` in `namespace`, to be adjusted.
pub fn drpair(name: &str, namespace: &str) -> DRPairBuilder {
    let spec = DRPairSpec {
        selector: LabelSelector {
            match_labels: Some(BTreeMap::from([("app".to_owned(), name.to_owned())])),
            match_expressions: None,
        },
        primary_site: SITE_A.to_owned(),
        secondary_site: SITE_B.to_owned(),
        rpo: "1m".to_owned(),
        volumes: None,
        transform: Default::default(),
        standby: StandbyMode::default(),
        hooks: None,
        failover: Default::default(),
        retain_generations: crate::drpair::DEFAULT_RETAIN_GENERATIONS,
        deletion_policy: Default::default(),
        full_scan_every: crate::drpair::DEFAULT_FULL_SCAN_EVERY,
        drill: None,
    };
    let mut pair = DRPair::new(name, spec);
    pair.metadata.namespace = Some(namespace.to_owned());
    DRPairBuilder { pair }
}

impl DRPair {
    /// `drpair("app", "default")`: a valid pair to adjust in tests.
    pub fn test() -> DRPairBuilder {
        drpair("app", "default")
    }
}

impl DRPairBuilder {
    /// Sets `spec.rpo` (any text; it is not checked here).
    pub fn with_rpo(mut self, rpo: &str) -> Self {
        self.pair.spec.rpo = rpo.to_owned();
        self
    }

    /// Sets `spec.primarySite` and `spec.secondarySite`.
    pub fn sites(mut self, primary: &str, secondary: &str) -> Self {
        self.pair.spec.primary_site = primary.to_owned();
        self.pair.spec.secondary_site = secondary.to_owned();
        self
    }

    /// Replaces the selector.
    pub fn selector(mut self, selector: LabelSelector) -> Self {
        self.pair.spec.selector = selector;
        self
    }

    /// Sets `spec.volumes` to these PVC names.
    pub fn volumes(mut self, names: &[&str]) -> Self {
        self.pair.spec.volumes = Some(names.iter().map(|n| (*n).to_owned()).collect());
        self
    }

    /// Sets `spec.transform.replicas`.
    pub fn replicas(mut self, policy: ReplicaPolicy, count: Option<i32>) -> Self {
        self.pair.spec.transform.replicas.policy = policy;
        self.pair.spec.transform.replicas.count = count;
        self
    }

    /// Adds `key: value` to `spec.transform.labels.set`.
    pub fn set_label(mut self, key: &str, value: &str) -> Self {
        self.pair
            .spec
            .transform
            .labels
            .set
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// Adds `key` to `spec.transform.labels.remove`.
    pub fn remove_label(mut self, key: &str) -> Self {
        self.pair.spec.transform.labels.remove.push(key.to_owned());
        self
    }

    /// Maps StorageClass `from` to `to`.
    pub fn storage_class(mut self, from: &str, to: &str) -> Self {
        self.pair
            .spec
            .transform
            .storage_class_map
            .insert(from.to_owned(), to.to_owned());
        self
    }

    /// Adds a patch of one operation to objects of `kind` in the core group.
    pub fn patch(
        mut self,
        kind: &str,
        op: PatchOp,
        path: &str,
        value: Option<serde_json::Value>,
    ) -> Self {
        self.pair.spec.transform.patches.push(ResourcePatch {
            group: String::new(),
            kind: kind.to_owned(),
            name: None,
            patch: vec![JsonPatchOperation {
                op,
                path: path.to_owned(),
                value,
                from: None,
            }],
        });
        self
    }

    /// Sets `spec.standby`.
    pub fn standby(mut self, standby: StandbyMode) -> Self {
        self.pair.spec.standby = standby;
        self
    }

    /// Sets a pre-capture hook running `command`.
    pub fn pre_capture(mut self, command: &[&str]) -> Self {
        let hooks = self.pair.spec.hooks.get_or_insert_with(Hooks::default);
        hooks.pre_capture = Some(Hook {
            command: command.iter().map(|c| (*c).to_owned()).collect(),
            container: None,
            timeout_seconds: None,
        });
        self
    }

    /// Sets `spec.failover`: mode Automatic with these optional durations.
    pub fn automatic_failover(
        mut self,
        data_loss_allowance: Option<&str>,
        site_loss_timeout: Option<&str>,
    ) -> Self {
        let failover = &mut self.pair.spec.failover;
        failover.mode = FailoverMode::Automatic;
        failover.data_loss_allowance = data_loss_allowance.map(str::to_owned);
        failover.site_loss_timeout = site_loss_timeout.map(str::to_owned);
        self
    }

    /// Sets `spec.retainGenerations`.
    pub fn retain(mut self, generations: u32) -> Self {
        self.pair.spec.retain_generations = generations;
        self
    }

    /// Sets `spec.fullScanEvery`.
    pub fn full_scan_every(mut self, generations: u32) -> Self {
        self.pair.spec.full_scan_every = generations;
        self
    }

    /// Sets the status.
    pub fn with_status(mut self, status: DRPairStatus) -> Self {
        self.pair.status = Some(status);
        self
    }

    /// The spec alone.
    #[must_use]
    pub fn spec(self) -> DRPairSpec {
        self.pair.spec
    }

    /// The finished object.
    #[must_use]
    pub fn build(self) -> DRPair {
        self.pair
    }
}

/// Builds a [`Migration`]: by default a Planned migration of pair `app` to [`SITE_B`].
#[derive(Clone, Debug)]
#[must_use]
pub struct MigrationBuilder {
    migration: Migration,
}

/// A valid `Migration` called `name` in `namespace`, to be adjusted.
pub fn migration(name: &str, namespace: &str) -> MigrationBuilder {
    let mut migration = Migration::new(
        name,
        MigrationSpec {
            pair: "app".to_owned(),
            target_site: SITE_B.to_owned(),
            type_: MigrationType::Planned,
        },
    );
    migration.metadata.namespace = Some(namespace.to_owned());
    MigrationBuilder { migration }
}

impl MigrationBuilder {
    /// Sets `spec.pair`.
    pub fn pair(mut self, pair: &str) -> Self {
        self.migration.spec.pair = pair.to_owned();
        self
    }

    /// Sets `spec.targetSite`.
    pub fn target(mut self, site: &str) -> Self {
        self.migration.spec.target_site = site.to_owned();
        self
    }

    /// Sets `spec.type`.
    pub fn of_type(mut self, type_: MigrationType) -> Self {
        self.migration.spec.type_ = type_;
        self
    }

    /// Sets the status.
    pub fn with_status(mut self, status: MigrationStatus) -> Self {
        self.migration.status = Some(status);
        self
    }

    /// The spec alone.
    #[must_use]
    pub fn spec(self) -> MigrationSpec {
        self.migration.spec
    }

    /// The finished object.
    #[must_use]
    pub fn build(self) -> Migration {
        self.migration
    }
}

/// Builds a [`Site`]: endpoint `<name>.ferry.example:7443`, TLS secret `<name>-tls` in `ferry-system`.
#[derive(Clone, Debug)]
#[must_use]
pub struct SiteBuilder {
    site: Site,
}

/// A valid `Site` called `name`, to be adjusted.
pub fn site(name: &str) -> SiteBuilder {
    SiteBuilder {
        site: Site::new(
            name,
            SiteSpec {
                replicator_endpoint: format!("{name}.ferry.example:7443"),
                tls_secret_ref: SecretRef {
                    name: format!("{name}-tls"),
                    namespace: "ferry-system".to_owned(),
                },
                kubeconfig_secret_ref: None,
            },
        ),
    }
}

impl SiteBuilder {
    /// Sets `spec.replicatorEndpoint`.
    pub fn endpoint(mut self, endpoint: &str) -> Self {
        self.site.spec.replicator_endpoint = endpoint.to_owned();
        self
    }

    /// Sets `spec.kubeconfigSecretRef`.
    pub fn kubeconfig(mut self, name: &str, namespace: &str) -> Self {
        self.site.spec.kubeconfig_secret_ref = Some(SecretRef {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        });
        self
    }

    /// The spec alone.
    #[must_use]
    pub fn spec(self) -> SiteSpec {
        self.site.spec
    }

    /// The finished object.
    #[must_use]
    pub fn build(self) -> Site {
        self.site
    }
}
