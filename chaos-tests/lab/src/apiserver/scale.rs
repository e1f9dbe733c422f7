//! The `scale` subresource (`autoscaling/v1` Scale) of workloads and of CRDs that declare it.

use axum::http::{Method, StatusCode};
use axum::response::Response;
use lab_apimachinery::patch::PatchType;
use lab_apimachinery::status::ApiError;

use super::errors;
use serde_json::{json, Value};

use super::json_response;
use super::objects::{meta_str, name_of, set_pointer};
use super::registry::ScalePaths;
use super::store::Mutation;
use super::verbs::{apply_patch, internal, prepare_update, update_with, Part, Req};

/// `.spec.replicas` → `/spec/replicas`.
fn pointer(path: &str) -> String {
    path.replace('.', "/")
}

/// The Scale view of an object.
fn scale_of(paths: &ScalePaths, obj: &Value) -> Value {
    let get_i = |p: &str| {
        obj.pointer(&pointer(p))
            .and_then(Value::as_i64)
            .unwrap_or(0)
    };
    let mut status = json!({"replicas": get_i(&paths.status_replicas)});
    if let Some(sel) = paths
        .label_selector
        .as_deref()
        .and_then(|p| obj.pointer(&pointer(p)))
        .and_then(Value::as_str)
    {
        status["selector"] = json!(sel);
    }
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": name_of(obj),
            "namespace": meta_str(obj, "namespace"),
            "uid": meta_str(obj, "uid"),
            "resourceVersion": meta_str(obj, "resourceVersion"),
            "creationTimestamp": meta_str(obj, "creationTimestamp"),
        },
        "spec": {"replicas": get_i(&paths.spec_replicas)},
        "status": status,
    })
}

/// Serves GET, PUT and PATCH on `<resource>/<name>/scale`.
///
/// # Errors
/// 404 when the object is absent, 409 on a stale resourceVersion in a PUT, 422 when
/// `spec.replicas` is missing or negative.
pub fn serve(method: &Method, req: &Req<'_>) -> Result<Response, ApiError> {
    let paths = req
        .info
        .scale
        .clone()
        .expect("routed here only when the resource has a scale subresource");
    let ns = req.target.namespace.as_deref().unwrap_or_default();
    let name = req.target.name.as_deref().unwrap_or_default();
    if *method == Method::GET {
        let obj = super::verbs::read(&req.state.store, req.info, ns, name)?
            .ok_or_else(|| ApiError::not_found(&req.info.group, &req.info.plural, name))?;
        return Ok(json_response(StatusCode::OK, &scale_of(&paths, &obj)));
    }
    let body: Value = serde_json::from_slice(req.body)
        .map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
    let ptype = if *method == Method::PATCH {
        let ct = req
            .headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        Some(PatchType::from_content_type(ct).map_err(|_| errors::unsupported_patch_type())?)
    } else if *method == Method::PUT {
        None
    } else {
        return Err(ApiError::method_not_allowed(
            &req.info.group,
            &format!("{}/scale", req.info.plural),
            method.as_str(),
        ));
    };
    let stored = update_with(req.state, req.info, ns, name, |old| {
        let current = scale_of(&paths, old);
        let desired = match ptype {
            None => body.clone(),
            Some(PatchType::Apply) => lab_apimachinery::patch::merge_patch(&current, &body)
                .map_err(|e| errors::unprocessable(e.to_string()))?,
            Some(t) => apply_patch(t, &current, &body)?,
        };
        if let Some(rv) = meta_str(&desired, "resourceVersion").filter(|r| !r.is_empty()) {
            if Some(rv) != meta_str(old, "resourceVersion") {
                return Err(ApiError::stale_resource_version(
                    &req.info.group,
                    &req.info.plural,
                    name,
                ));
            }
        }
        let replicas = desired["spec"]["replicas"]
            .as_i64()
            .filter(|r| *r >= 0)
            .ok_or_else(|| {
                errors::invalid_field(
                    "autoscaling",
                    "Scale",
                    name,
                    "spec.replicas",
                    "Invalid value: must be greater than or equal to 0",
                )
            })?;
        let mut next = old.clone();
        set_pointer(&mut next, &pointer(&paths.spec_replicas), json!(replicas));
        if let Some(m) = next["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        let (mutation, removed) = prepare_update(req.info, old, next, Part::Main)?;
        Ok(match mutation {
            Mutation::Put(v) => (Mutation::Put(v), removed),
            other => (other, removed),
        })
    })
    .map_err(|e| if e.code == 500 { internal(&e) } else { e })?;
    Ok(json_response(StatusCode::OK, &scale_of(&paths, &stored)))
}
