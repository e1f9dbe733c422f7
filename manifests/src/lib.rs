//! An application's Kubernetes manifests: captured at the source, cleaned of what the source
//! cluster assigned, shipped inside a generation, and rewritten and ordered for creation at
//! the destination.
//!
//! Objects are full API objects as `serde_json::Value` (`apiVersion`, `kind`, `metadata`,
//! ...), so custom resources travel as faithfully as built-in kinds. The crate reads the
//! source cluster ([`capture()`]) and writes one object at a time ([`apply_object()`]); the
//! pipeline between is pure. Its users: the replicator (capture at the source, a warm
//! standby at the destination) and the failover controller (migration and failover).
//!
//! # Flow
//!
//! Source site, once per generation:
//!
//! 1. [`capture()`]: discovery, then every namespaced resource listed in the DRPair's
//!    namespace with its selector, minus what must not be shipped, plus every PVC the app's
//!    workloads use. Gives a [`CapturedApp`]: the objects and the claim names whose volumes
//!    the delta engine copies.
//! 2. [`sanitise()`]: drops uids, resource versions, status, allocated IPs and node ports,
//!    PV bindings, ... (pure).
//! 3. Wrap the objects in a [`ManifestBundle`]; [`ManifestBundle::to_json_bytes`] is what
//!    travels in the generation, next to the volume deltas.
//!
//! Destination site, when a generation is instantiated (migration, failover, or
//! `standby: Applied` after each commit):
//!
//! 4. [`ManifestBundle::from_json_bytes`].
//! 5. [`plan_instantiation()`], the one pipeline for every instantiation: [`transform()`]
//!    with the DRPair's `spec.transform` (labels, replicas, storage classes, JSON patches);
//!    then [`standby()`] for a warm standby (workloads at zero replicas, the count kept in
//!    [`ORIGINAL_REPLICAS_ANNOTATION`]) or PVCs pointed at the generation's snapshots to run
//!    the app; then [`instantiation_order()`]: waves to create one after the other,
//!    namespaces and CRDs first, workloads last.
//! 6. [`apply_object()`] each object, wave by wave (server-side apply).
//!
//! Invariant: every stage keeps the set of objects (capture decides it once); only their
//! content and order change.

mod apply;
mod capture;
mod object;
mod order;
mod plan;
mod sanitise;
mod transform;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use apply::{apply_object, ApplyError};
pub use capture::{
    capture, label_selector_query, ships_object, ships_resource, CaptureError, CapturedApp,
    SelectorError, LIST_PAGE_SIZE, UNDISCOVERED_GROUPS,
};
pub use object::ObjectKey;
pub use order::{instantiation_order, Wave};
pub use plan::{plan_instantiation, Instantiation, DRILL_LABEL};
pub use sanitise::{
    sanitise, DROPPED_ANNOTATIONS, DROPPED_PVC_ANNOTATIONS, JOB_CONTROLLER_UID_LABELS,
    SERVER_METADATA_FIELDS,
};
pub use transform::{
    standby, transform, TransformError, ORIGINAL_REPLICAS_ANNOTATION, ORIGINAL_SUSPEND_ANNOTATION,
};

/// Version of the [`ManifestBundle`] encoding written by this build.
pub const BUNDLE_FORMAT_VERSION: u32 = 1;

/// The manifests of one generation: sanitised objects, as they travel from source to
/// destination.
///
/// Encoded as UTF-8 JSON `{"formatVersion": 1, "objects": [...]}` ([`BUNDLE_FORMAT_VERSION`]),
/// objects in the order given. A reader rejects any other version rather than guess.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ManifestBundle {
    /// Full objects, each a JSON object with `apiVersion`, `kind` and `metadata.name`.
    pub objects: Vec<Value>,
}

/// Errors encoding or decoding a [`ManifestBundle`].
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Serialising to JSON failed.
    #[error("encoding the manifest bundle")]
    Encode(#[source] serde_json::Error),
    /// The bytes are not a JSON manifest bundle.
    #[error("decoding the manifest bundle")]
    Decode(#[source] serde_json::Error),
    /// The bundle was written in a format version this build does not read.
    #[error(
        "manifest bundle format version {found} is not supported (this build reads {supported})"
    )]
    UnsupportedVersion {
        /// The bundle's `formatVersion`.
        found: u32,
        /// [`BUNDLE_FORMAT_VERSION`].
        supported: u32,
    },
    /// An entry of `objects` is not a Kubernetes object.
    #[error("manifest bundle object {index}: {problem}")]
    InvalidObject {
        /// Index in `objects`.
        index: usize,
        /// What is wrong, e.g. `missing kind`.
        problem: &'static str,
    },
}

impl BundleError {
    /// Stable, low-cardinality label for metrics and Events.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Encode(_) => "encode",
            Self::Decode(_) => "decode",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::InvalidObject { .. } => "invalid_object",
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BundleWire<'a> {
    format_version: u32,
    objects: &'a [Value],
}

impl ManifestBundle {
    /// Encodes the bundle as compact UTF-8 JSON (see [`ManifestBundle`] for the shape).
    ///
    /// # Errors
    /// [`BundleError::Encode`] if serde_json fails (it does not for `Value`s; kept typed so
    /// callers need no `expect`).
    pub fn to_json_bytes(&self) -> Result<Vec<u8>, BundleError> {
        serde_json::to_vec(&BundleWire {
            format_version: BUNDLE_FORMAT_VERSION,
            objects: &self.objects,
        })
        .map_err(BundleError::Encode)
    }

    /// Decodes bytes written by [`ManifestBundle::to_json_bytes`], checking the format version
    /// and that every object has `apiVersion`, `kind` and `metadata.name` strings.
    ///
    /// # Errors
    /// [`BundleError::Decode`] for bytes that are not such JSON,
    /// [`BundleError::UnsupportedVersion`], [`BundleError::InvalidObject`].
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, BundleError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Owned {
            format_version: u32,
            objects: Vec<Value>,
        }
        let wire: Owned = serde_json::from_slice(bytes).map_err(BundleError::Decode)?;
        if wire.format_version != BUNDLE_FORMAT_VERSION {
            return Err(BundleError::UnsupportedVersion {
                found: wire.format_version,
                supported: BUNDLE_FORMAT_VERSION,
            });
        }
        for (index, object) in wire.objects.iter().enumerate() {
            let problem = if !object.is_object() {
                Some("not a JSON object")
            } else if !object["apiVersion"].is_string() {
                Some("missing apiVersion")
            } else if !object["kind"].is_string() {
                Some("missing kind")
            } else if !object["metadata"]["name"].is_string() {
                Some("missing metadata.name")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(BundleError::InvalidObject { index, problem });
            }
        }
        Ok(Self {
            objects: wire.objects,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bundle_round_trips() {
        let bundle = ManifestBundle {
            objects: vec![
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}}),
                json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 2}}),
            ],
        };
        let bytes = bundle.to_json_bytes().unwrap();
        assert!(bytes.starts_with(br#"{"formatVersion":1,"objects":["#));
        assert_eq!(ManifestBundle::from_json_bytes(&bytes).unwrap(), bundle);
        let empty = ManifestBundle::default();
        assert_eq!(
            ManifestBundle::from_json_bytes(&empty.to_json_bytes().unwrap()).unwrap(),
            empty
        );
    }

    #[test]
    fn bundle_decoding_errors() {
        let cases: [(&[u8], &str); 6] = [
            (b"not json", "decode"),
            (br#"{"objects": []}"#, "decode"),
            (br#"{"formatVersion": 2, "objects": []}"#, "unsupported_version"),
            (br#"{"formatVersion": 1, "objects": [1]}"#, "invalid_object"),
            (
                br#"{"formatVersion": 1, "objects": [{"apiVersion": "v1", "metadata": {"name": "x"}}]}"#,
                "invalid_object",
            ),
            (
                br#"{"formatVersion": 1, "objects": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}]}"#,
                "invalid_object",
            ),
        ];
        for (bytes, label) in cases {
            let err = ManifestBundle::from_json_bytes(bytes).unwrap_err();
            assert_eq!(
                err.metric_label(),
                label,
                "{}: {err}",
                String::from_utf8_lossy(bytes)
            );
        }
        let err = ManifestBundle::from_json_bytes(
            br#"{"formatVersion": 1, "objects": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}]}"#,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "manifest bundle object 0: missing metadata.name"
        );
    }
}
