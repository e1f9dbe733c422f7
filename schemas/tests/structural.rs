//! Every generated CRD is structural and has the agreed names, columns and subresources.
//!
//! The structural checks are the rules that matter for generated code
//! (Kubernetes docs, "Specifying a structural schema"): every node states a
//! `type` (or preserves unknown fields, or is int-or-string); no `$ref`; no
//! `oneOf`, `anyOf`, `allOf` or `not` (Ferry never needs them);
//! `additionalProperties` never beside `properties`; list-map keys required.

use ferry_schemas::{DRDrill, DRPair, Migration, Site};
use kube::CustomResourceExt;
use serde_json::Value;

fn check(path: &str, node: &Value, problems: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        problems.push(format!("{path}: schema is not an object"));
        return;
    };
    for banned in [
        "$ref",
        "oneOf",
        "anyOf",
        "allOf",
        "not",
        "definitions",
        "$defs",
    ] {
        if obj.contains_key(banned) {
            problems.push(format!("{path}: has {banned}"));
        }
    }
    let untyped_ok = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        || obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    if !obj.contains_key("type") && !untyped_ok {
        problems.push(format!("{path}: no type"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        problems.push(format!("{path}: both properties and additionalProperties"));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            check(&format!("{path}.{name}"), child, problems);
        }
    }
    if let Some(items) = obj.get("items") {
        check(&format!("{path}[]"), items, problems);
        if let Some(keys) = obj
            .get("x-kubernetes-list-map-keys")
            .and_then(Value::as_array)
        {
            let required = items.get("required").and_then(Value::as_array);
            for key in keys {
                if !required.is_some_and(|r| r.contains(key)) {
                    problems.push(format!(
                        "{path}: list-map key {key} is not required in items"
                    ));
                }
            }
        }
    }
    if let Some(extra) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        check(&format!("{path}{{}}"), extra, problems);
    }
}

fn schema_of(crd_json: &Value) -> &Value {
    &crd_json["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
}

#[test]
fn crd_schemas_are_structural() {
    for crd in ferry_schemas::crd::all_crds() {
        let json = serde_json::to_value(&crd).expect("a CRD serialises to JSON");
        let name = crd.metadata.name.clone().unwrap_or_default();
        assert_eq!(crd.spec.versions.len(), 1, "{name}: one version, v1alpha1");
        let mut problems = Vec::new();
        check(&name, schema_of(&json), &mut problems);
        assert!(
            problems.is_empty(),
            "{name}: schema is not structural:\n{}",
            problems.join("\n")
        );
    }
}

/// `NAME=jsonPath:type` for each printer column, as `kubectl get` heads them.
fn columns(crd_json: &Value) -> Vec<String> {
    crd_json["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{}={}:{}",
                c["name"].as_str().unwrap_or_default().to_uppercase(),
                c["jsonPath"].as_str().unwrap_or_default(),
                c["type"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

/// (CRD as JSON, name, scope, short name, printer columns)
type Expected<'a> = (Value, &'a str, &'a str, Option<&'a str>, &'a [&'a str]);

#[test]
fn crds_have_the_agreed_names_columns_and_subresources() {
    let cases: [Expected; 4] = [
        (
            serde_json::to_value(Site::crd()).unwrap(),
            "sites.ferry.dev",
            "Cluster",
            None,
            &[
                "ENDPOINT=.spec.replicatorEndpoint:string",
                "REACHABLE=.status.reachable:boolean",
                "LAST-SEEN=.status.lastSeenTime:date",
                "AGE=.metadata.creationTimestamp:date",
            ],
        ),
        (
            serde_json::to_value(DRPair::crd()).unwrap(),
            "drpairs.ferry.dev",
            "Namespaced",
            Some("drp"),
            &[
                "ACTIVE=.status.activeSite:string",
                "RPO=.spec.rpo:string",
                "LAG=.status.currentLagSeconds:number",
                "LAST-SYNC=.status.lastSyncTime:date",
                "PHASE=.status.phase:string",
                "LAST-DRILL=.status.lastDrill.result:string",
                "AGE=.metadata.creationTimestamp:date",
            ],
        ),
        (
            serde_json::to_value(Migration::crd()).unwrap(),
            "migrations.ferry.dev",
            "Namespaced",
            Some("mig"),
            &[
                "PAIR=.spec.pair:string",
                "TARGET=.spec.targetSite:string",
                "TYPE=.spec.type:string",
                "PHASE=.status.phase:string",
                "RTO=.status.rtoSeconds:number",
                "DATA-LOSS=.status.dataLossSeconds:number",
                "AGE=.metadata.creationTimestamp:date",
            ],
        ),
        (
            serde_json::to_value(DRDrill::crd()).unwrap(),
            "drdrills.ferry.dev",
            "Namespaced",
            Some("drill"),
            &[
                "PAIR=.spec.pair:string",
                "GENERATION=.status.generation:integer",
                "PHASE=.status.phase:string",
                "RTO=.status.rtoSeconds:number",
                "DATA-AGE=.status.dataAgeSeconds:number",
                "AGE=.metadata.creationTimestamp:date",
            ],
        ),
    ];
    for (crd, name, scope, short_name, want_columns) in cases {
        assert_eq!(crd["metadata"]["name"], name);
        assert_eq!(crd["spec"]["group"], "ferry.dev", "{name}");
        assert_eq!(crd["spec"]["versions"][0]["name"], "v1alpha1", "{name}");
        assert_eq!(crd["spec"]["scope"], scope, "{name}");
        assert_eq!(
            crd["spec"]["names"]["shortNames"][0].as_str(),
            short_name,
            "{name}"
        );
        assert_eq!(columns(&crd), want_columns, "{name}: printer columns");
        assert!(
            crd["spec"]["versions"][0]["subresources"]["status"].is_object(),
            "{name}: status subresource"
        );
    }
}

#[test]
fn duration_fields_carry_the_duration_pattern() {
    let crd = serde_json::to_value(DRPair::crd()).unwrap();
    let spec = &schema_of(&crd)["properties"]["spec"]["properties"];
    for pointer in [
        "/rpo",
        "/failover/properties/dataLossAllowance",
        "/failover/properties/siteLossTimeout",
    ] {
        let pattern = spec
            .pointer(&format!("{pointer}/pattern"))
            .and_then(Value::as_str);
        assert_eq!(
            pattern,
            Some(ferry_schemas::duration::DURATION_PATTERN),
            "spec{pointer}"
        );
    }
}

#[test]
fn conditions_are_list_maps_keyed_by_type() {
    for crd in ferry_schemas::crd::all_crds() {
        let json = serde_json::to_value(&crd).unwrap();
        let conditions = &schema_of(&json)["properties"]["status"]["properties"]["conditions"];
        assert_eq!(
            conditions["x-kubernetes-list-type"], "map",
            "{:?}",
            crd.metadata.name
        );
        assert_eq!(conditions["x-kubernetes-list-map-keys"][0], "type");
    }
}
