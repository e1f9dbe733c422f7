//! Object metadata rules every write follows: names, uids, timestamps, generation, and the
//! defaults the real apiserver fills in for built-in kinds.

use std::time::SystemTime;

use rand::Rng;
use serde_json::{json, Value};

use super::registry::ResourceInfo;

/// Now as an RFC 3339 timestamp with second precision (metav1.Time's wire format).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// `metadata.<field>` as a string, if present.
pub fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// `metadata.name`, or empty.
pub fn name_of(obj: &Value) -> &str {
    meta_str(obj, "name").unwrap_or_default()
}

/// The `metadata.finalizers` list (empty when absent).
pub fn finalizers(obj: &Value) -> Vec<String> {
    obj["metadata"]["finalizers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks a name against DNS-1123 subdomain rules (RFC 1123, as `metadata.name` requires for
/// most kinds): at most 253 characters of `[a-z0-9.-]`, starting and ending alphanumeric.
/// Returns the apiserver's explanation when it fails.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let ends_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 253 || !ok_chars || !ends_ok {
        return Err("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".into());
    }
    Ok(())
}

/// `generateName` plus five random characters, as the apiserver's name generator does.
pub fn generate_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    let suffix: String = (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{suffix}")
}

/// Whether anything outside `metadata` and `status` differs: the rule for bumping
/// `metadata.generation`.
pub fn spec_changed(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("metadata");
            m.remove("status");
            m.remove("apiVersion");
            m.remove("kind");
        }
        v
    };
    strip(old) != strip(new)
}

/// Fills the fields a new object gets from the server: uid, creationTimestamp, generation,
/// namespace, and the defaults of built-in kinds.
pub fn init_new(info: &ResourceInfo, obj: &mut Value, namespace: Option<&str>) {
    obj["apiVersion"] = json!(info.api_version());
    obj["kind"] = json!(info.kind);
    let meta = &mut obj["metadata"];
    meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
    meta["creationTimestamp"] = json!(now_rfc3339());
    meta["generation"] = json!(1);
    if let Some(ns) = namespace {
        meta["namespace"] = json!(ns);
    }
    if let Some(m) = meta.as_object_mut() {
        m.remove("deletionTimestamp");
        m.remove("deletionGracePeriodSeconds");
        m.remove("resourceVersion");
    }
    if info.status_subresource {
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
    }
    default_builtin(info, obj);
}

/// Defaults the real apiserver applies to built-in kinds that Ferry or its tests rely on.
fn default_builtin(info: &ResourceInfo, obj: &mut Value) {
    let set_if_absent = |v: &mut Value, ptr: &str, value: Value| {
        if v.pointer(ptr).is_none_or(Value::is_null) {
            let (parent, field) = ptr.rsplit_once('/').expect("pointer has a parent");
            if v.pointer(parent).is_none_or(|p| !p.is_object()) {
                set_pointer(v, parent, json!({}));
            }
            if let Some(p) = v.pointer_mut(parent) {
                p[field] = value;
            }
        }
    };
    match (info.group.as_str(), info.plural.as_str()) {
        ("", "namespaces") => set_if_absent(obj, "/status/phase", json!("Active")),
        ("", "pods") => set_if_absent(obj, "/status/phase", json!("Pending")),
        ("", "persistentvolumeclaims") => set_if_absent(obj, "/status/phase", json!("Pending")),
        ("", "persistentvolumes") => set_if_absent(obj, "/status/phase", json!("Pending")),
        ("", "services") => {
            let headless = obj["spec"]["clusterIP"].as_str() == Some("None");
            let external = obj["spec"]["type"].as_str() == Some("ExternalName");
            if !headless && !external && obj["spec"]["clusterIP"].as_str().is_none_or(str::is_empty)
            {
                let ip = cluster_ip(meta_str(obj, "namespace").unwrap_or_default(), name_of(obj));
                obj["spec"]["clusterIP"] = json!(ip);
                obj["spec"]["clusterIPs"] = json!([ip]);
            }
            set_if_absent(obj, "/spec/type", json!("ClusterIP"));
        }
        ("apps", "deployments" | "statefulsets" | "replicasets") => {
            set_if_absent(obj, "/spec/replicas", json!(1))
        }
        ("batch", "jobs") => {
            set_if_absent(obj, "/spec/backoffLimit", json!(6));
            set_if_absent(obj, "/spec/completions", json!(1));
            set_if_absent(obj, "/spec/parallelism", json!(1));
        }
        ("batch", "cronjobs") => set_if_absent(obj, "/spec/suspend", json!(false)),
        _ => {}
    }
}

/// Writes `value` at JSON pointer `ptr`, creating intermediate objects.
pub fn set_pointer(obj: &mut Value, ptr: &str, value: Value) {
    let mut cur = obj;
    let parts: Vec<&str> = ptr.split('/').skip(1).collect();
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = json!({});
        }
        if i + 1 == parts.len() {
            cur[*part] = value;
            return;
        }
        cur = &mut cur[*part];
    }
}

/// A stable service IP from the 10.96.0.0/12 service range for `namespace/name`.
fn cluster_ip(namespace: &str, name: &str) -> String {
    let h = blake3::hash(format!("{namespace}/{name}").as_bytes());
    let b = h.as_bytes();
    format!("10.96.{}.{}", b[0], b[1].max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("web-1.example").is_ok());
        for bad in ["", "Web", "-a", "a-", "a_b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let n = generate_name("job-");
        assert!(n.starts_with("job-") && n.len() == 9);
    }

    #[test]
    fn generation_follows_spec_only() {
        let a = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"replicas": 1}, "status": {"x": 1}});
        let mut b = a.clone();
        b["metadata"]["labels"]["a"] = json!("2");
        b["status"]["x"] = json!(2);
        assert!(!spec_changed(&a, &b));
        b["spec"]["replicas"] = json!(2);
        assert!(spec_changed(&a, &b));
    }
}
