//! The REST verbs on resources: get, list, create, update, patch (four types), delete and
//! deletecollection, on the main resource and its `status` subresource.
//!
//! Every write is one [`Store::mutate`] call, so its precondition checks (resourceVersion,
//! existence) and its effect are atomic, and is flushed before the client hears about it.

use std::sync::Arc;

use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;
use base64::Engine;
use lab_apimachinery::patch::{self, PatchType};
use lab_apimachinery::selector::{FieldSelector, LabelSelector};
use lab_apimachinery::status::ApiError;

use super::errors;
use lab_apimachinery::validation;
use serde_json::{json, Value};

use super::lifecycle::{self, DeleteOptions};
use super::objects::{self, meta_str, name_of};
use super::registry::ResourceInfo;
use super::request::{Query, Target};
use super::store::{object_key, Mutation, Store};
use super::{json_response, protobuf, scale, table, watch, ApiState};

/// One resource request, resolved.
pub struct Req<'a> {
    /// Server state.
    pub state: &'a Arc<ApiState>,
    /// The resource addressed.
    pub info: &'a ResourceInfo,
    /// The path's parts.
    pub target: &'a Target,
    /// Query parameters.
    pub query: &'a Query,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// Request body.
    pub body: &'a [u8],
}

/// Which part of an object a write may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The main resource: everything but status when a status subresource exists.
    Main,
    /// The `/status` subresource: status only.
    Status,
}

impl Req<'_> {
    /// The request's namespace, required for namespaced single-object requests.
    fn namespace(&self) -> Result<&str, ApiError> {
        match (&self.target.namespace, self.info.namespaced) {
            (Some(ns), true) => Ok(ns),
            (None, false) => Ok(""),
            (None, true) => Err(errors::not_found_path()),
            (Some(_), false) => Err(errors::not_found_path()),
        }
    }

    fn name(&self) -> &str {
        self.target.name.as_deref().unwrap_or_default()
    }

    fn key(&self) -> Result<String, ApiError> {
        Ok(object_key(
            &self.info.storage_prefix(),
            self.namespace()?,
            self.name(),
        ))
    }

    fn not_found(&self) -> ApiError {
        ApiError::not_found(&self.info.group, &self.info.plural, self.name())
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
    }

    /// Decodes the body as JSON, as YAML or protobuf when the content type says so.
    fn decode_body(&self) -> Result<Value, ApiError> {
        if self.content_type().starts_with(protobuf::MEDIA_TYPE) {
            // kubectl's typed generators (`kubectl create ns|configmap|deployment`) send
            // protobuf.
            return protobuf::decode(self.body);
        }
        let value: Value = if self.content_type().contains("yaml") {
            serde_yaml::from_slice(self.body)
                .map_err(|e| ApiError::bad_request(format!("invalid YAML body: {e}")))?
        } else {
            serde_json::from_slice(self.body)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
        };
        Ok(value)
    }

    fn wants_table(&self) -> bool {
        self.headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("as=Table"))
    }
}

/// Serves one request on a resource.
///
/// # Errors
/// An [`ApiError`] for the client: 404 for a missing object, 405 for an unsupported verb, and
/// the verb's own errors.
pub async fn serve(method: &Method, req: Req<'_>) -> Result<Response, ApiError> {
    let named = req.target.name.is_some();
    let sub = req.target.subresource.as_deref();
    if sub == Some("status") && !req.info.status_subresource {
        return Err(req.not_found());
    }
    let response = match (method.as_str(), named, sub) {
        ("GET", false, None) if req.query.is_watch() => return watch::serve(&req),
        ("GET", false, None) => list(&req)?,
        ("POST", false, None) => create(&req)?,
        ("DELETE", false, None) => delete_collection(&req)?,
        ("GET", true, None | Some("status")) => get(&req)?,
        ("PUT", true, None) => update(&req, Part::Main)?,
        ("PUT", true, Some("status")) => update(&req, Part::Status)?,
        ("PATCH", true, None) => patch(&req, Part::Main)?,
        ("PATCH", true, Some("status")) => patch(&req, Part::Status)?,
        ("DELETE", true, None) => delete(&req)?,
        (_, true, Some("scale")) if req.info.scale.is_some() => scale::serve(method, &req)?,
        _ => {
            return Err(ApiError::method_not_allowed(
                &req.info.group,
                &req.info.plural,
                method.as_str(),
            ))
        }
    };
    // Acknowledge only what is durable.
    req.state
        .store
        .flush()
        .await
        .map_err(|e| ApiError::internal(format!("flushing the store: {e}")))?;
    Ok(response)
}

/// The object as the client sees it at the requested version.
pub fn present(info: &ResourceInfo, mut obj: Value) -> Value {
    obj["apiVersion"] = json!(info.api_version());
    obj["kind"] = json!(info.kind);
    obj
}

fn get(req: &Req<'_>) -> Result<Response, ApiError> {
    let obj = req
        .state
        .store
        .get(&req.key()?)
        .map_err(internal)?
        .ok_or_else(|| req.not_found())?;
    let obj = present(req.info, obj);
    if req.wants_table() {
        return Ok(json_response(
            StatusCode::OK,
            &table::table(req.info, &[obj], None),
        ));
    }
    Ok(json_response(StatusCode::OK, &obj))
}

/// Parsed label and field selectors of a list, watch or deletecollection.
pub struct Selectors {
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Selectors {
    /// Parses the query's selectors.
    ///
    /// # Errors
    /// 400 BadRequest naming the unparsable requirement.
    pub fn from_query(q: &Query) -> Result<Self, ApiError> {
        let labels = q
            .label_selector
            .as_deref()
            .unwrap_or("")
            .parse::<LabelSelector>()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let fields = q
            .field_selector
            .as_deref()
            .unwrap_or("")
            .parse::<FieldSelector>()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(Self { labels, fields })
    }

    /// Whether `obj` is selected.
    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches_object(obj) && self.fields.matches_object(obj)
    }
}

/// The store key prefix a collection request covers.
pub fn collection_prefix(info: &ResourceInfo, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("{}/{ns}/", info.storage_prefix()),
        None => format!("{}/", info.storage_prefix()),
    }
}

fn list(req: &Req<'_>) -> Result<Response, ApiError> {
    let selectors = Selectors::from_query(req.query)?;
    let (items, rv) = req
        .state
        .store
        .list(&collection_prefix(
            req.info,
            req.target.namespace.as_deref(),
        ))
        .map_err(internal)?;
    let after = match &req.query.continue_token {
        Some(token) => Some(decode_continue(token)?),
        None => None,
    };
    let mut selected = items
        .into_iter()
        .filter(|(k, obj)| after.as_ref().is_none_or(|a| k > a) && selectors.matches(obj));
    let limit = req.query.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
    let mut page = Vec::new();
    let mut last_key = None;
    for (k, obj) in selected.by_ref().take(limit) {
        last_key = Some(k);
        page.push(present(req.info, obj));
    }
    let remaining = selected.count();
    let cont = (remaining > 0)
        .then(|| last_key.map(|k| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k)))
        .flatten();
    if req.wants_table() {
        return Ok(json_response(
            StatusCode::OK,
            &table::table(req.info, &page, Some(rv)),
        ));
    }
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = cont {
        metadata["continue"] = json!(c);
        metadata["remainingItemCount"] = json!(remaining);
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"kind": format!("{}List", req.info.kind), "apiVersion": req.info.api_version(), "metadata": metadata, "items": page}),
    ))
}

fn decode_continue(token: &str) -> Result<String, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| ApiError::bad_request("continue key is not valid: malformed token"))
}

/// Maps a storage failure to a 500.
pub fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("storage: {e}"))
}

/// Validates a custom resource against its CRD schema: defaults, prunes unknown fields, then
/// checks, as the apiextensions apiserver does, in that order.
fn check_schema(info: &ResourceInfo, obj: &mut Value) -> Result<(), ApiError> {
    let Some(schema) = &info.schema else {
        return Ok(());
    };
    validation::apply_defaults(obj, schema);
    validation::prune(obj, schema);
    let errors = validation::validate(obj, schema);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            &info.group,
            &info.kind,
            name_of(obj),
            errors,
        ))
    }
}

fn check_kind(info: &ResourceInfo, obj: &Value) -> Result<(), ApiError> {
    if let Some(kind) = obj.get("kind").and_then(Value::as_str) {
        if kind != info.kind {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({kind}) does not match the expected kind ({})",
                info.kind
            )));
        }
    }
    if let Some(av) = obj.get("apiVersion").and_then(Value::as_str) {
        let group = av.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        if group != info.group {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                info.api_version()
            )));
        }
    }
    Ok(())
}

/// Prepares a new object for storage: name, metadata, namespace checks, schema. Shared by
/// create and by server-side apply of an absent object.
fn prepare_create(req: &Req<'_>, mut obj: Value) -> Result<Value, ApiError> {
    check_kind(req.info, &obj)?;
    let ns = req.namespace()?.to_string();
    if req.info.namespaced {
        if let Some(given) = meta_str(&obj, "namespace").filter(|g| !g.is_empty()) {
            if given != ns {
                return Err(ApiError::bad_request("the namespace of the provided object does not match the namespace sent on the request"));
            }
        }
        lifecycle::check_namespace_open(&req.state.store, &ns)?;
    }
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    if name_of(&obj).is_empty() {
        match meta_str(&obj, "generateName").filter(|g| !g.is_empty()) {
            Some(prefix) => obj["metadata"]["name"] = json!(objects::generate_name(prefix)),
            None => {
                return Err(errors::invalid_field(
                    &req.info.group,
                    &req.info.kind,
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                ))
            }
        }
    }
    if let Err(why) = objects::check_name(name_of(&obj)) {
        let name = name_of(&obj).to_string();
        return Err(errors::invalid_field(
            &req.info.group,
            &req.info.kind,
            &name,
            "metadata.name",
            &format!("Invalid value: {name:?}: {why}"),
        ));
    }
    objects::init_new(
        req.info,
        &mut obj,
        req.info.namespaced.then_some(ns.as_str()),
    );
    lifecycle::admit_default_storage_class(&req.state.store, req.info, &mut obj)?;
    lifecycle::check_builtin(req.info, &obj)?;
    check_schema(req.info, &mut obj)?;
    Ok(obj)
}

fn create(req: &Req<'_>) -> Result<Response, ApiError> {
    let obj = prepare_create(req, req.decode_body()?)?;
    if req.query.is_dry_run() {
        return Ok(json_response(StatusCode::CREATED, &present(req.info, obj)));
    }
    let ns = req.namespace()?;
    let key = object_key(&req.info.storage_prefix(), ns, name_of(&obj));
    let name = name_of(&obj).to_string();
    let (stored, ()) =
        req.state
            .store
            .mutate(&key, &req.info.storage_prefix(), ns, |old| match old {
                Some(_) => Err(ApiError::already_exists(
                    &req.info.group,
                    &req.info.plural,
                    &name,
                )),
                None => Ok((Mutation::Put(obj), ())),
            })?;
    let stored = stored.expect("a put returns the stored object");
    let stored = lifecycle::after_write(req.state, req.info, stored)?;
    Ok(json_response(
        StatusCode::CREATED,
        &present(req.info, stored),
    ))
}

/// Turns a requested new state of an existing object into the mutation to store, enforcing
/// the apiserver's update rules: resourceVersion precondition, status subresource split,
/// immutable metadata, generation, schema, and deletion once the last finalizer is gone.
/// Returns the mutation and whether it removes the object.
pub fn prepare_update(
    info: &ResourceInfo,
    old: &Value,
    requested: Value,
    part: Part,
) -> Result<(Mutation, bool), ApiError> {
    let name = name_of(old).to_string();
    if let Some(rv) = meta_str(&requested, "resourceVersion").filter(|s| !s.is_empty()) {
        if Some(rv) != meta_str(old, "resourceVersion") {
            return Err(ApiError::stale_resource_version(
                &info.group,
                &info.plural,
                &name,
            ));
        }
    }
    if !name_of(&requested).is_empty() && name_of(&requested) != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            name_of(&requested)
        )));
    }
    let mut next = match part {
        Part::Status => {
            let mut n = old.clone();
            match requested.get("status") {
                Some(s) => n["status"] = s.clone(),
                None => {
                    if let Some(m) = n.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            // Server-side apply to /status records its manager in metadata.
            if let Some(mf) = requested["metadata"].get("managedFields") {
                n["metadata"]["managedFields"] = mf.clone();
            }
            n
        }
        Part::Main => {
            let mut n = requested;
            check_kind(info, &n)?;
            if info.status_subresource {
                match old.get("status") {
                    Some(s) => n["status"] = s.clone(),
                    None => {
                        if let Some(m) = n.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            n
        }
    };
    if !next["metadata"].is_object() {
        next["metadata"] = json!({});
    }
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        match old["metadata"].get(field) {
            Some(v) => next["metadata"][field] = v.clone(),
            None => {
                if let Some(m) = next["metadata"].as_object_mut() {
                    m.remove(field);
                }
            }
        }
    }
    if part == Part::Main && next["metadata"].get("managedFields").is_none() {
        if let Some(mf) = old["metadata"].get("managedFields") {
            next["metadata"]["managedFields"] = mf.clone();
        }
    }
    let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
    next["metadata"]["generation"] = json!(if objects::spec_changed(old, &next) {
        generation + 1
    } else {
        generation
    });
    next = present(info, next);
    check_schema(info, &mut next)?;
    if next["metadata"].get("deletionTimestamp").is_some()
        && objects::finalizers(&next).is_empty()
        && info.plural != "namespaces"
    {
        return Ok((Mutation::Delete, true));
    }
    // A write that changes nothing is not stored and keeps the resourceVersion, as the
    // apiserver does; otherwise controllers that write status on every reconcile would loop.
    let mut unchanged = next.clone();
    unchanged["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    if unchanged == present(info, old.clone()) {
        return Ok((Mutation::Keep, false));
    }
    Ok((Mutation::Put(next), false))
}

/// Commits an update computed from the current object by `f`, then carries out what it
/// implies (a removal's garbage collection, a CRD's re-establishment).
///
/// # Errors
/// 404 when the object is absent; `f`'s and [`prepare_update`]'s errors.
pub fn update_with(
    state: &Arc<ApiState>,
    info: &ResourceInfo,
    namespace: &str,
    name: &str,
    f: impl FnOnce(&Value) -> Result<(Mutation, bool), ApiError>,
) -> Result<Value, ApiError> {
    let key = object_key(&info.storage_prefix(), namespace, name);
    let classes = lifecycle::classes_for_resize(&state.store, info)?;
    let (stored, removed) = state
        .store
        .mutate(&key, &info.storage_prefix(), namespace, |old| {
            let old = old.ok_or_else(|| ApiError::not_found(&info.group, &info.plural, name))?;
            let decided = f(&old)?;
            if let (Mutation::Put(next), _) = &decided {
                lifecycle::admit_claim_resize(&classes, info, &old, next)?;
            }
            Ok::<_, ApiError>(decided)
        })?;
    let stored = stored.ok_or_else(|| ApiError::not_found(&info.group, &info.plural, name))?;
    if removed {
        lifecycle::after_remove(
            state,
            &info.storage_prefix(),
            &stored,
            lifecycle::Propagation::Background,
        )?;
        return Ok(stored);
    }
    lifecycle::after_write(state, info, stored)
}

fn update(req: &Req<'_>, part: Part) -> Result<Response, ApiError> {
    let requested = req.decode_body()?;
    let stored = update_with(req.state, req.info, req.namespace()?, req.name(), |old| {
        prepare_update(req.info, old, requested, part)
    })?;
    Ok(json_response(StatusCode::OK, &present(req.info, stored)))
}

fn patch(req: &Req<'_>, part: Part) -> Result<Response, ApiError> {
    let ptype = PatchType::from_content_type(req.content_type())
        .map_err(|_| errors::unsupported_patch_type())?;
    if ptype == PatchType::Apply {
        return apply(req, part);
    }
    let doc: Value = serde_json::from_slice(req.body)
        .map_err(|e| ApiError::bad_request(format!("invalid patch body: {e}")))?;
    let stored = update_with(req.state, req.info, req.namespace()?, req.name(), |old| {
        let patched = apply_patch(ptype, old, &doc)?;
        prepare_update(req.info, old, patched, part)
    })?;
    Ok(json_response(StatusCode::OK, &present(req.info, stored)))
}

/// Applies a non-apply patch document to `base`.
///
/// # Errors
/// 422 when the patch cannot be applied (a failed RFC 6902 op, a malformed directive).
pub fn apply_patch(ptype: PatchType, base: &Value, doc: &Value) -> Result<Value, ApiError> {
    let result = match ptype {
        PatchType::Merge => patch::merge_patch(base, doc),
        PatchType::Json => patch::json_patch(base, doc),
        PatchType::StrategicMerge => patch::strategic_merge_patch(base, doc),
        PatchType::Apply => unreachable!("apply patches go through server-side apply"),
    };
    result.map_err(|e| errors::unprocessable(e.to_string()))
}

/// Server-side apply: creates the object when absent, otherwise merges the applied
/// configuration and records the field manager's ownership.
fn apply(req: &Req<'_>, part: Part) -> Result<Response, ApiError> {
    let manager = req
        .query
        .field_manager
        .clone()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("PATCH, application/apply-patch+yaml: fieldManager is required")
        })?;
    let applied = req.decode_body()?;
    let force = req.query.force.unwrap_or(false);
    let now = objects::now_rfc3339();
    let scope = match part {
        Part::Status => patch::FieldScope::StatusSubresource,
        Part::Main if req.info.status_subresource => patch::FieldScope::MainResource,
        Part::Main => patch::FieldScope::WholeObject,
    };
    let options = patch::ApplyOptions {
        manager: &manager,
        force,
        now_rfc3339: &now,
        scope,
    };
    let ns = req.namespace()?;
    let key = req.key()?;
    let existing = req.state.store.get(&key).map_err(internal)?;
    if existing.is_none() {
        if part == Part::Status {
            return Err(req.not_found());
        }
        let merged =
            patch::server_side_apply_with(None, &applied, &options).map_err(apply_error)?;
        let mut obj = prepare_create(req, merged)?;
        obj["metadata"]["name"] = json!(req.name());
        let name = req.name().to_string();
        let result =
            req.state
                .store
                .mutate(&key, &req.info.storage_prefix(), ns, |old| match old {
                    Some(_) => Err(ApiError::already_exists(
                        &req.info.group,
                        &req.info.plural,
                        &name,
                    )),
                    None => Ok((Mutation::Put(obj), ())),
                });
        match result {
            Ok((stored, ())) => {
                let stored = lifecycle::after_write(
                    req.state,
                    req.info,
                    stored.expect("a put returns the object"),
                )?;
                return Ok(json_response(
                    StatusCode::CREATED,
                    &present(req.info, stored),
                ));
            }
            // Created concurrently: apply onto it below.
            Err(e) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    let stored = update_with(req.state, req.info, ns, req.name(), |old| {
        let merged =
            patch::server_side_apply_with(Some(old), &applied, &options).map_err(apply_error)?;
        prepare_update(req.info, old, merged, part)
    })?;
    Ok(json_response(StatusCode::OK, &present(req.info, stored)))
}

fn apply_error(e: patch::ApplyError) -> ApiError {
    match e {
        patch::ApplyError::Conflict { .. } => errors::conflict(e.to_string()),
        other => errors::unprocessable(other.to_string()),
    }
}

fn delete_options(req: &Req<'_>) -> Result<DeleteOptions, ApiError> {
    let mut options = if req.body.iter().all(u8::is_ascii_whitespace) {
        DeleteOptions::default()
    } else {
        serde_json::from_slice(req.body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    if let Some(p) = &req.query.propagation_policy {
        options.propagation_policy = Some(p.clone());
    }
    Ok(options)
}

fn delete(req: &Req<'_>) -> Result<Response, ApiError> {
    let options = delete_options(req)?;
    let obj = lifecycle::delete(req.state, req.info, req.namespace()?, req.name(), &options)?;
    Ok(json_response(StatusCode::OK, &present(req.info, obj)))
}

fn delete_collection(req: &Req<'_>) -> Result<Response, ApiError> {
    let options = delete_options(req)?;
    let selectors = Selectors::from_query(req.query)?;
    let (items, _) = req
        .state
        .store
        .list(&collection_prefix(
            req.info,
            req.target.namespace.as_deref(),
        ))
        .map_err(internal)?;
    let mut deleted = Vec::new();
    for (_, obj) in items.into_iter().filter(|(_, o)| selectors.matches(o)) {
        let ns = meta_str(&obj, "namespace").unwrap_or_default().to_string();
        match lifecycle::delete(req.state, req.info, &ns, name_of(&obj), &options) {
            Ok(o) => deleted.push(present(req.info, o)),
            // Removed meanwhile by someone else: nothing left to do.
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let rv = req.state.store.current_rv();
    Ok(json_response(
        StatusCode::OK,
        &json!({"kind": format!("{}List", req.info.kind), "apiVersion": req.info.api_version(), "metadata": {"resourceVersion": rv.to_string()}, "items": deleted}),
    ))
}

/// Reads an object by resource, namespace and name (for lifecycle and scale).
///
/// # Errors
/// 500 on storage failure.
pub fn read(
    store: &Store,
    info: &ResourceInfo,
    namespace: &str,
    name: &str,
) -> Result<Option<Value>, ApiError> {
    store
        .get(&object_key(&info.storage_prefix(), namespace, name))
        .map_err(internal)
}
