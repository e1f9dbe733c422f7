//! The CustomResourceDefinitions generated from the types, and their YAML rendering for `crdgen`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{DRDrill, DRPair, Migration, Site};

/// First line of every rendered CRD file.
pub const GENERATED_HEADER: &str =
    "# Generated from ferry-schemas by `cargo run -p ferry-schemas --bin crdgen`. Do not edit.\n";

/// Every Ferry CRD, in a fixed order (Site, DRPair, Migration, DRDrill).
#[must_use]
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![Site::crd(), DRPair::crd(), Migration::crd(), DRDrill::crd()]
}

/// Renders one CRD as a YAML document, preceded by [`GENERATED_HEADER`].
///
/// The output is deterministic (maps are ordered), so it can be committed and
/// compared byte for byte.
///
/// # Panics
///
/// Panics if serde_yaml cannot serialise the CRD, which would need a map with
/// non-string keys; `CustomResourceDefinition` has none.
#[must_use]
pub fn render_crd_yaml(crd: &CustomResourceDefinition) -> String {
    let body = serde_yaml::to_string(crd).expect("a CustomResourceDefinition serialises to YAML");
    format!("{GENERATED_HEADER}{body}")
}

/// The file name a CRD is committed under: `<plural>.<group>.yaml`
/// (its `metadata.name` plus `.yaml`), e.g. `drpairs.ferry.dev.yaml`.
#[must_use]
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or_default())
}

/// One generated CRD file: its name under `deploy/helm/ferry/crds` and its contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrdFile {
    /// File name, e.g. `drpairs.ferry.dev.yaml`.
    pub file_name: String,
    /// YAML text, as [`render_crd_yaml`] returns it.
    pub yaml: String,
}

/// Every CRD rendered as a file; what `crdgen` writes and the freshness test compares.
#[must_use]
pub fn crd_files() -> Vec<CrdFile> {
    all_crds()
        .iter()
        .map(|crd| CrdFile {
            file_name: crd_file_name(crd),
            yaml: render_crd_yaml(crd),
        })
        .collect()
}
