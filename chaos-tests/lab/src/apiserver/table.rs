//! `meta.k8s.io/v1` Table output, so `kubectl get` shows a CRD's additionalPrinterColumns
//! and a built-in kind's usual columns ([`super::printers`]).

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use super::objects::name_of;
use super::printers;
use super::registry::ResourceInfo;

/// Renders `items` as a Table: NAME, the resource's printer columns (a CRD's
/// additionalPrinterColumns, else the built-in kind's printer, if any), AGE.
pub fn table(info: &ResourceInfo, items: &[Value], rv: Option<u64>) -> Value {
    let mut columns = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace."}),
    ];
    let builtin = if info.printer_columns.is_empty() {
        printers::for_kind(&info.group, &info.kind)
    } else {
        None
    };
    let mut has_age = false;
    for col in &info.printer_columns {
        has_age |= col["jsonPath"] == ".metadata.creationTimestamp";
        columns.push(json!({"name": col["name"], "type": col["type"], "format": col.get("format").cloned().unwrap_or(json!("")), "description": col.get("description").cloned().unwrap_or(json!("")), "priority": col.get("priority").cloned().unwrap_or(json!(0))}));
    }
    for (name, kind) in builtin.iter().flat_map(|p| p.columns) {
        columns.push(
            json!({"name": name, "type": kind, "format": "", "description": "", "priority": 0}),
        );
    }
    if !has_age {
        columns.push(json!({"name": "Age", "type": "date", "format": "", "description": "CreationTimestamp"}));
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|obj| {
            let mut cells = vec![json!(name_of(obj))];
            for col in &info.printer_columns {
                let path = col["jsonPath"].as_str().unwrap_or_default();
                let value = obj.pointer(&path.replace('.', "/")).cloned().unwrap_or(Value::Null);
                let cell = if col["type"] == "date" { value.as_str().map(age).map(Value::String).unwrap_or(Value::Null) } else { value };
                cells.push(cell);
            }
            if let Some(printer) = &builtin {
                cells.extend((printer.cells)(obj));
            }
            if !has_age {
                cells.push(obj["metadata"]["creationTimestamp"].as_str().map(age).map(Value::String).unwrap_or(Value::Null));
            }
            json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}})
        })
        .collect();
    let mut meta = json!({});
    if let Some(rv) = rv {
        meta["resourceVersion"] = json!(rv.to_string());
    }
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "columnDefinitions": columns, "rows": rows})
}

/// Age of an RFC 3339 timestamp in kubectl's short form (`5s`, `3m`, `2h`, `4d`).
fn age(ts: &str) -> String {
    let Ok(t) = humantime::parse_rfc3339_weak(ts) else {
        return "<unknown>".into();
    };
    let secs = SystemTime::now()
        .duration_since(t)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}
