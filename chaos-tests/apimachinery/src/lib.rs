//! Pure Kubernetes API machinery for the Ferry lab.
//!
//! The lab API server (`ferry-lab`) stores objects as JSON and needs the same
//! semantics a real kube-apiserver applies to them. This crate holds the parts
//! that are pure functions of JSON values, with no I/O:
//!
//! - [`selector`]: label and field selectors (`k8s.io/apimachinery/pkg/labels`).
//! - [`patch`]: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic
//!   merge patch and server-side apply.
//! - [`validation`]: OpenAPI v3 structural-schema validation and pruning of
//!   custom resources, with field-path errors in the apiserver's wording.
//! - [`pattern`]: OpenAPI `pattern`s with Go's RE2 semantics (the `regex` crate).
//! - [`status`]: `metav1.Status` errors with the codes and reasons clients expect.

pub mod patch;
pub mod pattern;
pub mod selector;
pub mod status;
pub mod validation;
