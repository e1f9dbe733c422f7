//! Server-side apply: field sets per manager (`managedFields`, `FieldsV1`), conflicts, and
//! the bookkeeping of `Update` operations.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use super::strategic::{effective_list_kind, ListKind};

/// Which part of an object a write covers, following whether the resource
/// has a status subresource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FieldScope {
    /// The resource has no status subresource (ConfigMap, Secret, ...): the
    /// whole object is tracked.
    #[default]
    WholeObject,
    /// The main endpoint of a resource that has a status subresource
    /// (Deployment, most custom resources): `status` is ignored.
    MainResource,
    /// The `/status` subresource: only `status` is taken and tracked, and the
    /// managed-fields entry carries `"subresource": "status"`.
    StatusSubresource,
}

impl FieldScope {
    fn subresource(self) -> Option<&'static str> {
        match self {
            FieldScope::StatusSubresource => Some("status"),
            FieldScope::WholeObject | FieldScope::MainResource => None,
        }
    }
}

/// Options for [`server_side_apply_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOptions<'a> {
    /// The `fieldManager` query parameter.
    pub manager: &'a str,
    /// The `force` query parameter: take over conflicting fields instead of failing.
    pub force: bool,
    /// The time recorded in the managed-fields entry, RFC 3339 (`2024-05-01T10:00:00Z`).
    pub now_rfc3339: &'a str,
    /// Which part of the object this apply covers.
    pub scope: FieldScope,
}

/// One field owned by another manager whose value the apply would change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyConflict {
    /// The field path in SMD notation: `.spec.replicas`,
    /// `.spec.template.spec.containers[name="web"].image`.
    pub path: String,
    /// The owning manager's name.
    pub manager: String,
    /// The owning entry's operation, `Apply` or `Update`.
    pub operation: String,
    /// The owning entry's `apiVersion`.
    pub api_version: String,
    /// The owning entry's subresource, if any.
    pub subresource: Option<String>,
}

impl ApplyConflict {
    /// How the apiserver names the manager: `"name"`, plus
    /// ` with subresource "status"` and, for `Update` entries, ` using apps/v1`.
    pub fn manager_description(&self) -> String {
        let mut out = quote(&self.manager);
        if let Some(subresource) = &self.subresource {
            out.push_str(&format!(" with subresource {}", quote(subresource)));
        }
        if self.operation == "Update" {
            out.push_str(&format!(" using {}", self.api_version));
        }
        out
    }
}

/// Quotes like Go's `%q` for the strings that occur here.
fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// Renders the apiserver's conflict message (`getConflictMessage`).
fn conflict_message(conflicts: &[ApplyConflict]) -> String {
    if let [only] = conflicts {
        return format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            only.manager_description(),
            only.path
        );
    }
    let mut by_manager: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for conflict in conflicts {
        by_manager
            .entry(conflict.manager_description())
            .or_default()
            .push(&conflict.path);
    }
    let mut lines = Vec::new();
    for (manager, paths) in by_manager {
        lines.push(format!("conflicts with {manager}:"));
        lines.extend(paths.into_iter().map(|p| format!("- {p}")));
    }
    format!(
        "Apply failed with {} conflicts: {}",
        conflicts.len(),
        lines.join("\n")
    )
}

/// What is wrong with one `metadata.managedFields` entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManagedFieldsProblem {
    /// The entry is not a JSON object.
    #[error("must be an object")]
    NotAnObject,
    /// `operation` is not `Apply` or `Update`.
    #[error("operation must be \"Apply\" or \"Update\", got {operation}")]
    UnknownOperation {
        /// The operation as JSON.
        operation: String,
    },
    /// `fieldsType` is not `FieldsV1`.
    #[error("fieldsType must be \"FieldsV1\", got {fields_type}")]
    UnsupportedFieldsType {
        /// The fields type as JSON.
        fields_type: String,
    },
    /// `fieldsV1`, or a node inside it, is not a JSON object.
    #[error("fieldsV1 must be a tree of JSON objects")]
    FieldsV1NotAnObject,
    /// A `fieldsV1` key is not `.`, `f:<name>`, `k:<object>`, `v:<json>` or `i:<index>`.
    #[error("invalid fieldsV1 key {key:?}")]
    InvalidFieldsV1Key {
        /// The key as found.
        key: String,
    },
}

/// An error from [`server_side_apply`] or [`record_update`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The applied configuration (or the new object of an update) is not a JSON object.
    #[error("the applied configuration must be a JSON object")]
    AppliedNotAnObject,
    /// The stored object is not a JSON object.
    #[error("the existing object is not a JSON object")]
    ExistingNotAnObject,
    /// The applied configuration has no `apiVersion` string.
    #[error("apiVersion must be set in the applied configuration")]
    MissingApiVersion,
    /// The applied configuration has no `kind` string.
    #[error("kind must be set in the applied configuration")]
    MissingKind,
    /// The applied configuration's `kind` differs from the stored object's.
    #[error("the applied configuration's kind {applied:?} does not match the existing object's kind {existing:?}")]
    KindMismatch {
        /// The stored object's kind.
        existing: String,
        /// The applied configuration's kind.
        applied: String,
    },
    /// The applied configuration sets `metadata.managedFields` (the apiserver
    /// requires it to be absent).
    #[error("metadata.managedFields must be nil")]
    ManagedFieldsInApplyConfiguration,
    /// `metadata.managedFields` of the stored object is present but not a list.
    #[error("metadata.managedFields must be a list")]
    ManagedFieldsNotAList,
    /// One `metadata.managedFields` entry of the stored object is malformed.
    #[error("metadata.managedFields[{index}]: {problem}")]
    InvalidManagedFields {
        /// Index of the entry.
        index: usize,
        /// What is wrong with it.
        problem: ManagedFieldsProblem,
    },
    /// An apply to the status subresource of an object that does not exist
    /// (the apiserver answers 404).
    #[error("cannot apply to the status subresource of an object that does not exist")]
    StatusOfMissingObject,
    /// The apply would change fields other managers own (HTTP 409); the message
    /// is the apiserver's, e.g. `Apply failed with 1 conflict: conflict with
    /// "kubectl-client-side-apply" using apps/v1: .spec.replicas`.
    #[error("{}", conflict_message(.conflicts))]
    Conflict {
        /// Each conflicting field and its owner, in field order.
        conflicts: Vec<ApplyConflict>,
    },
}

/// One step of a field path (`fieldpath.PathElement`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PathElement {
    /// A map or struct field: `f:<name>`.
    Field(String),
    /// A keyed-list element: `k:{...}`; key field name to canonical JSON value.
    Key(BTreeMap<String, String>),
    /// A set element: `v:<canonical JSON>`.
    Value(String),
    /// A list position: `i:<index>` (only read from stored entries).
    Index(usize),
}

impl PathElement {
    /// The `FieldsV1` key for this element.
    fn fields_v1_key(&self) -> String {
        match self {
            PathElement::Field(name) => format!("f:{name}"),
            PathElement::Key(key) => format!("k:{}", key_object_json(key)),
            PathElement::Value(value) => format!("v:{value}"),
            PathElement::Index(index) => format!("i:{index}"),
        }
    }

    /// Parses one `FieldsV1` key (not `.`).
    fn parse_fields_v1_key(key: &str) -> Option<Self> {
        let (prefix, rest) = key.split_at_checked(2)?;
        match prefix {
            "f:" => Some(PathElement::Field(rest.to_owned())),
            "k:" => match serde_json::from_str::<Value>(rest).ok()? {
                Value::Object(map) => Some(PathElement::Key(
                    map.iter()
                        .map(|(k, v)| (k.clone(), canonical_json(v)))
                        .collect(),
                )),
                _ => None,
            },
            "v:" => serde_json::from_str::<Value>(rest)
                .ok()
                .map(|v| PathElement::Value(canonical_json(&v))),
            "i:" => rest.parse().ok().map(PathElement::Index),
            _ => None,
        }
    }

    /// Whether a list element is the one this step names.
    fn selects(&self, element: &Value) -> bool {
        match self {
            PathElement::Key(key) => key
                .iter()
                .all(|(k, v)| element.get(k).map(canonical_json).as_deref() == Some(v)),
            PathElement::Value(value) => canonical_json(element) == *value,
            PathElement::Field(_) | PathElement::Index(_) => false,
        }
    }
}

impl fmt::Display for PathElement {
    /// SMD's notation: `.name`, `[name="web"]`, `[="x"]`, `[0]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathElement::Field(name) => write!(f, ".{name}"),
            PathElement::Key(key) => {
                let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "[{}]", parts.join(","))
            }
            PathElement::Value(value) => write!(f, "[={value}]"),
            PathElement::Index(index) => write!(f, "[{index}]"),
        }
    }
}

/// `{"k":v,...}` with keys sorted and values already canonical.
fn key_object_json(key: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = key
        .iter()
        .map(|(k, v)| format!("{}:{v}", quote(k)))
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// Compact JSON with object keys sorted, whatever serde_json's map order.
fn canonical_json(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let parts: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{}", quote(k), canonical_json(v)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", parts.join(","))
        }
        scalar => scalar.to_string(),
    }
}

fn path_string(path: &[PathElement]) -> String {
    path.iter().map(ToString::to_string).collect()
}

/// A set of field paths as a tree (`fieldpath.Set`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FieldSet {
    /// Whether the path leading here is itself in the set.
    member: bool,
    children: BTreeMap<PathElement, FieldSet>,
}

impl FieldSet {
    fn is_empty(&self) -> bool {
        !self.member && self.children.is_empty()
    }

    fn node(&self, path: &[PathElement]) -> Option<&FieldSet> {
        match path.split_first() {
            None => Some(self),
            Some((head, rest)) => self.children.get(head)?.node(rest),
        }
    }

    fn contains(&self, path: &[PathElement]) -> bool {
        self.node(path).is_some_and(|n| n.member)
    }

    /// Whether the path or anything below it is in the set.
    fn covers(&self, path: &[PathElement]) -> bool {
        self.node(path).is_some_and(|n| !n.is_empty())
    }

    fn insert(&mut self, path: &[PathElement]) {
        match path.split_first() {
            None => self.member = true,
            Some((head, rest)) => self.children.entry(head.clone()).or_default().insert(rest),
        }
    }

    /// Takes the path out of the set, pruning nodes left empty.
    fn remove(&mut self, path: &[PathElement]) {
        match path.split_first() {
            None => self.member = false,
            Some((head, rest)) => {
                if let Some(child) = self.children.get_mut(head) {
                    child.remove(rest);
                    if child.is_empty() {
                        self.children.remove(head);
                    }
                }
            }
        }
    }

    /// Drops a whole subtree.
    fn remove_subtree(&mut self, path: &[PathElement]) {
        match path.split_first() {
            None => *self = FieldSet::default(),
            Some((head, [])) => {
                self.children.remove(head);
            }
            Some((head, rest)) => {
                if let Some(child) = self.children.get_mut(head) {
                    child.remove_subtree(rest);
                    if child.is_empty() {
                        self.children.remove(head);
                    }
                }
            }
        }
    }

    /// Every member path, parents before children.
    fn members(&self) -> Vec<Vec<PathElement>> {
        let mut out = Vec::new();
        self.collect_members(&mut Vec::new(), &mut out);
        out
    }

    fn collect_members(&self, prefix: &mut Vec<PathElement>, out: &mut Vec<Vec<PathElement>>) {
        if self.member {
            out.push(prefix.clone());
        }
        for (element, child) in &self.children {
            prefix.push(element.clone());
            child.collect_members(prefix, out);
            prefix.pop();
        }
    }

    /// Member paths with nothing below them: the values a manager sets.
    fn leaves(&self) -> Vec<Vec<PathElement>> {
        self.members()
            .into_iter()
            .filter(|p| self.node(p).is_some_and(|n| n.children.is_empty()))
            .collect()
    }

    fn to_fields_v1(&self) -> Value {
        let mut map = Map::new();
        if self.member && !self.children.is_empty() {
            map.insert(".".to_owned(), Value::Object(Map::new()));
        }
        for (element, child) in &self.children {
            map.insert(element.fields_v1_key(), child.to_fields_v1());
        }
        Value::Object(map)
    }

    fn from_fields_v1(value: &Value) -> Result<FieldSet, ManagedFieldsProblem> {
        let Value::Object(map) = value else {
            return Err(ManagedFieldsProblem::FieldsV1NotAnObject);
        };
        let mut set = FieldSet::default();
        for (key, child) in map {
            if key == "." {
                set.member = true;
                continue;
            }
            let element = PathElement::parse_fields_v1_key(key)
                .ok_or_else(|| ManagedFieldsProblem::InvalidFieldsV1Key { key: key.clone() })?;
            let mut child_set = FieldSet::from_fields_v1(child)?;
            if child_set.children.is_empty() {
                child_set.member = true;
            }
            set.children.insert(element, child_set);
        }
        Ok(set)
    }

    /// Adds every field of `value`, a value found at `parent.field`.
    fn add_value(&mut self, value: &Value, parent: &str, field: &str) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, child) in map {
                    self.children
                        .entry(PathElement::Field(key.clone()))
                        .or_default()
                        .add_value(child, field, key);
                }
            }
            Value::Array(items) if !items.is_empty() => {
                match effective_list_kind(parent, field, &[items.as_slice()]) {
                    ListKind::Keyed(key) => {
                        for item in items {
                            let node = self.children.entry(key_element(item, key)).or_default();
                            node.member = true;
                            node.add_value(item, field, "");
                        }
                    }
                    ListKind::Set => {
                        for item in items {
                            self.children
                                .entry(PathElement::Value(canonical_json(item)))
                                .or_default()
                                .member = true;
                        }
                    }
                    ListKind::Atomic => self.member = true,
                }
            }
            _ => self.member = true,
        }
    }

    /// The field set of a whole object, without the fields SSA never tracks,
    /// restricted to `scope`.
    fn of_object(object: &Value, scope: FieldScope) -> FieldSet {
        let mut set = FieldSet::default();
        set.add_value(object, "", "");
        for field in ["apiVersion", "kind"] {
            set.remove_subtree(&[PathElement::Field(field.to_owned())]);
        }
        for field in ["name", "namespace"]
            .iter()
            .chain(SERVER_OWNED_METADATA.iter())
        {
            set.remove_subtree(&[
                PathElement::Field("metadata".to_owned()),
                PathElement::Field((*field).to_owned()),
            ]);
        }
        let status = [PathElement::Field("status".to_owned())];
        match scope {
            FieldScope::WholeObject => {}
            FieldScope::MainResource => set.remove_subtree(&status),
            FieldScope::StatusSubresource => {
                let kept = set.children.remove(&status[0]);
                set = FieldSet::default();
                if let Some(kept) = kept {
                    set.children.insert(status[0].clone(), kept);
                }
            }
        }
        set
    }
}

/// Metadata the server owns: never tracked, never copied from an applied configuration.
const SERVER_OWNED_METADATA: [&str; 8] = [
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// The `k:{...}` step for an element of a list keyed by `key`.
fn key_element(item: &Value, key: &str) -> PathElement {
    let value = item.get(key).map(canonical_json).unwrap_or_default();
    PathElement::Key(BTreeMap::from([(key.to_owned(), value)]))
}

fn get_path<'v>(value: &'v Value, path: &[PathElement]) -> Option<&'v Value> {
    let Some((head, rest)) = path.split_first() else {
        return Some(value);
    };
    let next = match head {
        PathElement::Field(name) => value.as_object()?.get(name)?,
        PathElement::Index(index) => value.as_array()?.get(*index)?,
        PathElement::Key(_) | PathElement::Value(_) => {
            value.as_array()?.iter().find(|e| head.selects(e))?
        }
    };
    get_path(next, rest)
}

/// Removes the value at `path`, if there is one.
fn remove_path(value: &mut Value, path: &[PathElement]) {
    let Some((head, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        match (head, value) {
            (PathElement::Field(name), Value::Object(map)) => {
                map.remove(name);
            }
            (PathElement::Index(index), Value::Array(items)) if *index < items.len() => {
                items.remove(*index);
            }
            (PathElement::Key(_) | PathElement::Value(_), Value::Array(items)) => {
                items.retain(|e| !head.selects(e));
            }
            _ => {}
        }
        return;
    }
    let next = match (head, value) {
        (PathElement::Field(name), Value::Object(map)) => map.get_mut(name),
        (PathElement::Index(index), Value::Array(items)) => items.get_mut(*index),
        (PathElement::Key(_) | PathElement::Value(_), Value::Array(items)) => {
            items.iter_mut().find(|e| head.selects(e))
        }
        _ => None,
    };
    if let Some(next) = next {
        remove_path(next, rest);
    }
}

/// Merges an applied value into an existing one found at `parent.field`.
fn apply_merge(existing: &Value, applied: &Value, parent: &str, field: &str) -> Value {
    match (existing, applied) {
        (Value::Object(existing_map), Value::Object(applied_map)) => {
            let mut out = existing_map.clone();
            for (key, applied_child) in applied_map {
                let merged = match out.get(key) {
                    Some(existing_child) => apply_merge(existing_child, applied_child, field, key),
                    None => applied_child.clone(),
                };
                out.insert(key.clone(), merged);
            }
            Value::Object(out)
        }
        (Value::Array(existing_items), Value::Array(applied_items)) => {
            match effective_list_kind(
                parent,
                field,
                &[existing_items.as_slice(), applied_items.as_slice()],
            ) {
                ListKind::Keyed(key) => {
                    let mut out = existing_items.clone();
                    for item in applied_items {
                        let id = item.get(key);
                        match out.iter().position(|e| e.get(key) == id) {
                            Some(i) => out[i] = apply_merge(&out[i], item, field, ""),
                            None => out.push(item.clone()),
                        }
                    }
                    Value::Array(out)
                }
                ListKind::Set => {
                    let mut out = existing_items.clone();
                    for item in applied_items {
                        if !out.contains(item) {
                            out.push(item.clone());
                        }
                    }
                    Value::Array(out)
                }
                ListKind::Atomic => applied.clone(),
            }
        }
        _ => applied.clone(),
    }
}

/// One parsed `metadata.managedFields` entry.
#[derive(Debug, Clone)]
struct ManagedEntry {
    manager: String,
    operation: String,
    api_version: String,
    time: Option<Value>,
    subresource: Option<String>,
    fields: FieldSet,
}

impl ManagedEntry {
    fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("manager".to_owned(), Value::String(self.manager.clone()));
        map.insert(
            "operation".to_owned(),
            Value::String(self.operation.clone()),
        );
        map.insert(
            "apiVersion".to_owned(),
            Value::String(self.api_version.clone()),
        );
        if let Some(time) = &self.time {
            map.insert("time".to_owned(), time.clone());
        }
        map.insert(
            "fieldsType".to_owned(),
            Value::String("FieldsV1".to_owned()),
        );
        map.insert("fieldsV1".to_owned(), self.fields.to_fields_v1());
        if let Some(subresource) = &self.subresource {
            map.insert("subresource".to_owned(), Value::String(subresource.clone()));
        }
        Value::Object(map)
    }

    fn from_json(index: usize, value: &Value) -> Result<ManagedEntry, ApplyError> {
        let invalid = |problem| ApplyError::InvalidManagedFields { index, problem };
        let Value::Object(map) = value else {
            return Err(invalid(ManagedFieldsProblem::NotAnObject));
        };
        let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_owned);
        let operation = match map.get("operation") {
            Some(Value::String(op)) if op == "Apply" || op == "Update" => op.clone(),
            other => {
                return Err(invalid(ManagedFieldsProblem::UnknownOperation {
                    operation: other.map_or_else(|| "null".to_owned(), Value::to_string),
                }))
            }
        };
        match map.get("fieldsType") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if t == "FieldsV1" => {}
            Some(other) => {
                return Err(invalid(ManagedFieldsProblem::UnsupportedFieldsType {
                    fields_type: other.to_string(),
                }))
            }
        }
        let fields = match map.get("fieldsV1") {
            None | Some(Value::Null) => FieldSet::default(),
            Some(fields) => FieldSet::from_fields_v1(fields).map_err(invalid)?,
        };
        Ok(ManagedEntry {
            manager: text("manager").unwrap_or_default(),
            operation,
            api_version: text("apiVersion").unwrap_or_default(),
            time: map.get("time").filter(|t| !t.is_null()).cloned(),
            subresource: text("subresource").filter(|s| !s.is_empty()),
            fields,
        })
    }
}

/// Reads `metadata.managedFields` of a stored object.
fn read_entries(object: &Value) -> Result<Vec<ManagedEntry>, ApplyError> {
    match object.pointer("/metadata/managedFields") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| ManagedEntry::from_json(i, item))
            .collect(),
        Some(_) => Err(ApplyError::ManagedFieldsNotAList),
    }
}

/// Writes `metadata.managedFields` (removing it when there are no entries).
fn write_entries(object: &mut Value, entries: &[ManagedEntry]) {
    let Value::Object(map) = object else {
        return;
    };
    let metadata = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !metadata.is_object() {
        *metadata = Value::Object(Map::new());
    }
    if let Value::Object(metadata) = metadata {
        if entries.is_empty() {
            metadata.remove("managedFields");
        } else {
            metadata.insert(
                "managedFields".to_owned(),
                Value::Array(entries.iter().map(ManagedEntry::to_json).collect()),
            );
        }
    }
}

fn string_field<'v>(object: &'v Value, field: &str) -> Option<&'v str> {
    object.get(field).and_then(Value::as_str)
}

/// Computes the `FieldsV1` set of an object as server-side apply would record
/// it for a manager that set every field of `object`: for example
/// `{"f:metadata":{"f:labels":{"f:app":{}}},"f:spec":{"f:replicas":{}}}`.
///
/// `apiVersion`, `kind`, `metadata.name`, `metadata.namespace` and the
/// server-owned metadata are left out; `scope` drops or keeps `status`.
pub fn fields_v1(object: &Value, scope: FieldScope) -> Value {
    FieldSet::of_object(object, scope).to_fields_v1()
}

/// Server-side apply of `applied` by `manager` to a resource without a status
/// subresource ([`FieldScope::WholeObject`]); see [`server_side_apply_with`].
///
/// # Errors
///
/// As [`server_side_apply_with`].
pub fn server_side_apply(
    existing: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    now_rfc3339: &str,
) -> Result<Value, ApplyError> {
    server_side_apply_with(
        existing,
        applied,
        &ApplyOptions {
            manager,
            force,
            now_rfc3339,
            scope: FieldScope::WholeObject,
        },
    )
}

/// Server-side apply: merges the applied configuration into the existing
/// object (or creates it when `existing` is `None`), checks and records field
/// ownership in `metadata.managedFields`, and returns the new object. The
/// semantics, and how they differ from the real structured-merge-diff, are in
/// the [module docs](self).
///
/// On create the result is the applied configuration (without server-owned
/// metadata and, per `options.scope`, without `status`) plus the manager's
/// entry; the caller fills `uid`, `resourceVersion`, `creationTimestamp`.
///
/// # Errors
///
/// [`ApplyError::AppliedNotAnObject`], [`ApplyError::ExistingNotAnObject`],
/// [`ApplyError::MissingApiVersion`], [`ApplyError::MissingKind`],
/// [`ApplyError::KindMismatch`], [`ApplyError::ManagedFieldsInApplyConfiguration`];
/// [`ApplyError::ManagedFieldsNotAList`] and [`ApplyError::InvalidManagedFields`]
/// for malformed stored entries; [`ApplyError::StatusOfMissingObject`] for a
/// status apply without an object; [`ApplyError::Conflict`] listing every
/// conflicting field when `force` is false.
pub fn server_side_apply_with(
    existing: Option<&Value>,
    applied: &Value,
    options: &ApplyOptions<'_>,
) -> Result<Value, ApplyError> {
    let Value::Object(applied_map) = applied else {
        return Err(ApplyError::AppliedNotAnObject);
    };
    let api_version = string_field(applied, "apiVersion")
        .ok_or(ApplyError::MissingApiVersion)?
        .to_owned();
    let applied_kind = string_field(applied, "kind").ok_or(ApplyError::MissingKind)?;
    match applied.pointer("/metadata/managedFields") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) if items.is_empty() => {}
        Some(_) => return Err(ApplyError::ManagedFieldsInApplyConfiguration),
    }
    let config = applied_configuration(applied_map, options.scope);
    let new_set = FieldSet::of_object(&config, options.scope);
    let subresource = options.scope.subresource().map(str::to_owned);
    let own_entry = ManagedEntry {
        manager: options.manager.to_owned(),
        operation: "Apply".to_owned(),
        api_version,
        time: Some(Value::String(options.now_rfc3339.to_owned())),
        subresource: subresource.clone(),
        fields: new_set.clone(),
    };

    let Some(existing) = existing else {
        if options.scope == FieldScope::StatusSubresource {
            return Err(ApplyError::StatusOfMissingObject);
        }
        let mut created = config;
        write_entries(&mut created, &[own_entry]);
        return Ok(created);
    };
    if !existing.is_object() {
        return Err(ApplyError::ExistingNotAnObject);
    }
    if let Some(existing_kind) = string_field(existing, "kind") {
        if existing_kind != applied_kind {
            return Err(ApplyError::KindMismatch {
                existing: existing_kind.to_owned(),
                applied: applied_kind.to_owned(),
            });
        }
    }

    let mut entries = read_entries(existing)?;
    if entries.is_empty() {
        let fields = FieldSet::of_object(existing, FieldScope::WholeObject);
        if !fields.is_empty() {
            entries.push(ManagedEntry {
                manager: "before-first-apply".to_owned(),
                operation: "Update".to_owned(),
                api_version: string_field(existing, "apiVersion")
                    .unwrap_or_default()
                    .to_owned(),
                time: None,
                subresource: None,
                fields,
            });
        }
    }
    let own_index = entries.iter().position(|e| {
        e.manager == options.manager && e.operation == "Apply" && e.subresource == subresource
    });
    let previous = own_index.map(|i| entries[i].fields.clone());

    let mut conflicts = Vec::new();
    for path in new_set.leaves() {
        let Some(current) = get_path(existing, &path) else {
            continue;
        };
        if get_path(&config, &path) == Some(current) {
            continue;
        }
        for (index, entry) in entries.iter_mut().enumerate() {
            if Some(index) == own_index
                || entry.manager == options.manager
                || !entry.fields.contains(&path)
            {
                continue;
            }
            if options.force {
                entry.fields.remove(&path);
            } else {
                conflicts.push(ApplyConflict {
                    path: path_string(&path),
                    manager: entry.manager.clone(),
                    operation: entry.operation.clone(),
                    api_version: entry.api_version.clone(),
                    subresource: entry.subresource.clone(),
                });
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(ApplyError::Conflict { conflicts });
    }

    let mut merged = apply_merge(existing, &config, "", "");
    if let Some(previous) = previous {
        for path in previous.members() {
            if new_set.covers(&path) {
                continue;
            }
            let owned_elsewhere = entries
                .iter()
                .enumerate()
                .any(|(i, e)| Some(i) != own_index && e.fields.covers(&path));
            if !owned_elsewhere {
                remove_path(&mut merged, &path);
            }
        }
    }

    match own_index {
        Some(index) => entries[index] = own_entry,
        None => entries.push(own_entry),
    }
    let own_position = own_index.unwrap_or(entries.len() - 1);
    let entries: Vec<ManagedEntry> = entries
        .into_iter()
        .enumerate()
        .filter(|(i, e)| *i == own_position || !e.fields.is_empty())
        .map(|(_, e)| e)
        .collect();
    write_entries(&mut merged, &entries);
    Ok(merged)
}

/// The part of an applied configuration that is merged: server-owned metadata
/// dropped, and `status` dropped or kept alone per `scope`.
fn applied_configuration(applied: &Map<String, Value>, scope: FieldScope) -> Value {
    let mut config = applied.clone();
    if let Some(Value::Object(metadata)) = config.get_mut("metadata") {
        for field in SERVER_OWNED_METADATA {
            metadata.remove(field);
        }
    }
    match scope {
        FieldScope::WholeObject => {}
        FieldScope::MainResource => {
            config.remove("status");
        }
        FieldScope::StatusSubresource => {
            config
                .retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status"));
            if let Some(Value::Object(metadata)) = config.get_mut("metadata") {
                metadata.retain(|k, _| k == "name" || k == "namespace");
            }
        }
    }
    Value::Object(config)
}

/// Records a non-apply write (create, update, or a merge/JSON/strategic patch)
/// by `manager` in `metadata.managedFields`, as the apiserver does for
/// `operation: Update`, and returns `new` with the entries written.
///
/// The base entries are those of `new` when it carries a non-empty list (a
/// client echoing or editing them), else those of `old`. A list of only empty
/// entries (`[{}]`) clears managed fields, and nothing is recorded. Otherwise
/// the manager's `Update` entry (per manager, `apiVersion` and subresource)
/// gains every field that `new` adds or whose leaf value it changes, and those
/// fields leave every other entry; fields `old` had and `new` lacks leave all
/// entries; entries left empty are dropped. Values are compared without a
/// schema (see the [module docs](self)).
///
/// # Errors
///
/// [`ApplyError::AppliedNotAnObject`] when `new` is not an object;
/// [`ApplyError::ExistingNotAnObject`] when `old` is not;
/// [`ApplyError::MissingApiVersion`] when `new` has no `apiVersion`;
/// [`ApplyError::ManagedFieldsNotAList`] / [`ApplyError::InvalidManagedFields`]
/// for malformed entries.
pub fn record_update(
    old: Option<&Value>,
    new: &Value,
    manager: &str,
    now_rfc3339: &str,
    scope: FieldScope,
) -> Result<Value, ApplyError> {
    if !new.is_object() {
        return Err(ApplyError::AppliedNotAnObject);
    }
    if old.is_some_and(|o| !o.is_object()) {
        return Err(ApplyError::ExistingNotAnObject);
    }
    let api_version = string_field(new, "apiVersion")
        .ok_or(ApplyError::MissingApiVersion)?
        .to_owned();
    let mut result = new.clone();

    let supplied = match new.pointer("/metadata/managedFields") {
        Some(Value::Array(items)) if !items.is_empty() => Some(items),
        None | Some(Value::Null) | Some(Value::Array(_)) => None,
        Some(_) => return Err(ApplyError::ManagedFieldsNotAList),
    };
    if supplied.is_some_and(|items| {
        items
            .iter()
            .all(|i| i.as_object().is_some_and(Map::is_empty))
    }) {
        write_entries(&mut result, &[]);
        return Ok(result);
    }
    let mut entries = match (supplied, old) {
        (Some(_), _) => read_entries(new)?,
        (None, Some(old)) => read_entries(old)?,
        (None, None) => Vec::new(),
    };

    let new_set = FieldSet::of_object(new, scope);
    let old_set = old
        .map(|o| FieldSet::of_object(o, scope))
        .unwrap_or_default();
    let mut changed = FieldSet::default();
    for path in new_set.members() {
        let is_leaf = new_set.node(&path).is_some_and(|n| n.children.is_empty());
        let modified = !old_set.contains(&path)
            || (is_leaf && old.and_then(|o| get_path(o, &path)) != get_path(new, &path));
        if modified {
            changed.insert(&path);
        }
    }
    let removed: Vec<Vec<PathElement>> = old_set
        .members()
        .into_iter()
        .filter(|p| !new_set.contains(p))
        .collect();

    let subresource = scope.subresource().map(str::to_owned);
    let changed_paths = changed.members();
    for entry in &mut entries {
        for path in &removed {
            entry.fields.remove(path);
        }
        let is_own = entry.manager == manager
            && entry.operation == "Update"
            && entry.api_version == api_version
            && entry.subresource == subresource;
        if !is_own {
            for path in &changed_paths {
                entry.fields.remove(path);
            }
        }
    }
    match entries.iter_mut().find(|e| {
        e.manager == manager
            && e.operation == "Update"
            && e.api_version == api_version
            && e.subresource == subresource
    }) {
        Some(own) => {
            for path in &changed_paths {
                own.fields.insert(path);
            }
            if !changed_paths.is_empty() {
                own.time = Some(Value::String(now_rfc3339.to_owned()));
            }
        }
        None if !changed.is_empty() => entries.push(ManagedEntry {
            manager: manager.to_owned(),
            operation: "Update".to_owned(),
            api_version,
            time: Some(Value::String(now_rfc3339.to_owned())),
            subresource,
            fields: changed,
        }),
        None => {}
    }
    entries.retain(|e| !e.fields.is_empty());
    write_entries(&mut result, &entries);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_v1_shapes() {
        let object = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "uid": "u", "resourceVersion": "1", "finalizers": ["x"], "annotations": {}},
            "spec": {"ports": [{"containerPort": 80}], "args": ["a"], "empty": []},
            "status": {"phase": "Running"}
        });
        assert_eq!(
            fields_v1(&object, FieldScope::MainResource),
            json!({
                "f:metadata": {"f:finalizers": {"v:\"x\"": {}}, "f:annotations": {}},
                "f:spec": {"f:ports": {"k:{\"containerPort\":80}": {".": {}, "f:containerPort": {}}}, "f:args": {}, "f:empty": {}}
            })
        );
        assert_eq!(
            fields_v1(&object, FieldScope::StatusSubresource),
            json!({"f:status": {"f:phase": {}}})
        );
        let set = FieldSet::of_object(&object, FieldScope::WholeObject);
        assert_eq!(FieldSet::from_fields_v1(&set.to_fields_v1()).unwrap(), set);
        let path = vec![
            PathElement::Field("spec".into()),
            PathElement::Field("ports".into()),
            key_element(&json!({"containerPort": 80}), "containerPort"),
        ];
        assert_eq!(path_string(&path), ".spec.ports[containerPort=80]");
    }
}
