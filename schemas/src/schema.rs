//! Hand-written JSON schemas for fields whose Rust type would give a non-structural one.

use schemars::{json_schema, Schema, SchemaGenerator};

/// Schema for a field holding any JSON value (an RFC 6902 `value`): no `type`,
/// `x-kubernetes-preserve-unknown-fields: true` so the apiserver neither
/// prunes nor rejects it, and `nullable: true` so an explicit `null` survives.
pub(crate) fn any_json(_gen: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-preserve-unknown-fields": true,
        "nullable": true,
    })
}

/// Schema for an embedded Kubernetes object spec kept as written (a Job's `spec`): an object,
/// `x-kubernetes-preserve-unknown-fields: true`; the API server validates it when the object
/// is created from it.
pub(crate) fn any_object(_gen: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}
