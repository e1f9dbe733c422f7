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
