//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`) for the built-in kinds that
//! kubectl's typed generators send: `kubectl create namespace|configmap|secret|deployment|
//! service|job|cronjob|serviceaccount|role|rolebinding|clusterrole|clusterrolebinding`.
//!
//! The wire format is the API server's protobuf serializer
//! (<https://kubernetes.io/docs/reference/using-api/api-concepts/#protobuf-encoding>): the four
//! magic bytes `k8s\0`, then a `runtime.Unknown` whose `typeMeta` names the kind and whose `raw`
//! holds the object's own message. The messages are the `k8s-pb` crate's; each is turned into
//! the JSON the rest of the server stores.
//!
//! Every message is taken apart field by field with no `..`, so a field added to `k8s-pb` fails
//! the build here rather than vanishing. Fields the lab does not translate (volumes, probes,
//! affinity, ...) are refused with 415 naming the field, never dropped: kubectl's generators
//! never set them, and a client that does can send the same object as JSON.

use std::collections::BTreeMap;

use base64::Engine;
use k8s_pb::api::apps::v1 as apps;
use k8s_pb::api::batch::v1 as batch;
use k8s_pb::api::core::v1 as core;
use k8s_pb::api::rbac::v1 as rbac;
use k8s_pb::apimachinery::pkg::api::resource::Quantity;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use k8s_pb::apimachinery::pkg::util::intstr::IntOrString;
use lab_apimachinery::status::{ApiError, StatusReason};
use prost::Message;
use serde_json::{json, Map, Value};

/// The media type of Kubernetes protobuf bodies.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// The four bytes every Kubernetes protobuf body starts with.
const MAGIC: &[u8; 4] = b"k8s\0";

type Obj = Map<String, Value>;

/// Decodes a protobuf request body into the object's JSON form (with `apiVersion` and `kind`).
///
/// # Errors
/// 400 for a body without the `k8s\0` magic or that does not parse as its message; 415 naming
/// the kind for a kind outside the list above, or naming the field for a field the lab does not
/// translate (send those as JSON).
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| ApiError::bad_request("protobuf body does not start with k8s\\0"))?;
    let unknown = Unknown::decode(rest).map_err(malformed)?;
    let Unknown {
        type_meta,
        raw,
        content_encoding,
        content_type,
    } = unknown;
    if content_encoding.as_deref().is_some_and(|e| !e.is_empty()) {
        return Err(unsupported("the envelope's contentEncoding"));
    }
    if content_type.as_deref().is_some_and(|t| !t.is_empty()) {
        return Err(unsupported("the envelope's contentType"));
    }
    let type_meta = type_meta.unwrap_or_default();
    let api_version = type_meta.api_version.unwrap_or_default();
    let kind = type_meta.kind.unwrap_or_default();
    let raw = raw.unwrap_or_default();
    let mut obj = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => namespace(parse(&raw)?)?,
        ("v1", "ConfigMap") => config_map(parse(&raw)?)?,
        ("v1", "Secret") => secret(parse(&raw)?)?,
        ("v1", "ServiceAccount") => service_account(parse(&raw)?)?,
        ("v1", "Service") => service(parse(&raw)?)?,
        ("apps/v1", "Deployment") => deployment(parse(&raw)?)?,
        ("batch/v1", "Job") => job(parse(&raw)?)?,
        ("batch/v1", "CronJob") => cron_job(parse(&raw)?)?,
        ("rbac.authorization.k8s.io/v1", "Role") => role(parse(&raw)?)?,
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => cluster_role(parse(&raw)?)?,
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            let rbac::RoleBinding {
                metadata,
                subjects,
                role_ref,
            } = parse(&raw)?;
            binding(metadata, subjects, role_ref)?
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            let rbac::ClusterRoleBinding {
                metadata,
                subjects,
                role_ref,
            } = parse(&raw)?;
            binding(metadata, subjects, role_ref)?
        }
        _ => {
            return Err(ApiError::new(
                StatusReason::UnsupportedMediaType,
                format!(
                    "the lab's API server reads protobuf bodies of kubectl's generator kinds \
                     only, not {api_version} {kind}; send it as JSON"
                ),
            ))
        }
    };
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    Ok(Value::Object(obj))
}

fn parse<M: Message + Default>(raw: &[u8]) -> Result<M, ApiError> {
    M::decode(raw).map_err(malformed)
}

fn malformed(e: prost::DecodeError) -> ApiError {
    ApiError::bad_request(format!("invalid protobuf body: {e}"))
}

/// 415 for a field set in a protobuf body that the lab does not translate.
fn unsupported(field: &str) -> ApiError {
    ApiError::new(
        StatusReason::UnsupportedMediaType,
        format!(
            "{field} is not read from protobuf bodies by the lab's API server; \
             send the object as JSON"
        ),
    )
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// Refuses each listed field that is set, naming it as `path.jsonName`.
macro_rules! refuse_set {
    ($path:expr; $($field:ident),+ $(,)?) => {$(
        if !is_default(&$field) {
            return Err(unsupported(&format!("{}.{}", $path, json_name(stringify!($field)))));
        }
    )+};
}

/// A Rust field name (`image_pull_policy`, `r#type`) as its JSON name (`imagePullPolicy`).
fn json_name(rust: &str) -> String {
    let rust = rust.trim_start_matches("r#");
    let mut out = String::with_capacity(rust.len());
    let mut upper = false;
    for c in rust.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Builds a JSON object from `(name, value)` pairs, leaving out the unset ones (`None`, empty
/// lists and maps), as the API server's JSON encoding omits them.
struct Fields(Obj);

impl Fields {
    fn new() -> Self {
        Fields(Map::new())
    }

    /// A field Go holds as a pointer (`*int32`, `*bool`), where a zero is meaningful; strings
    /// are the exception, as Go's protobuf encoding writes every non-pointer string, empty
    /// ones too, and JSON leaves those out (`omitempty`).
    fn opt<T: Into<Value>>(mut self, name: &str, value: Option<T>) -> Self {
        match value.map(Into::into) {
            Some(Value::String(s)) if s.is_empty() => {}
            Some(v) => {
                self.0.insert(name.into(), v);
            }
            None => {}
        }
        self
    }

    /// A field Go holds as a plain value with `omitempty` (`int32`, `bool`): its protobuf
    /// encoding always carries it, so a zero means unset.
    fn nz<T: Into<Value> + Default + PartialEq>(self, name: &str, value: Option<T>) -> Self {
        self.opt(name, value.filter(|v| *v != T::default()))
    }

    fn list<T: Into<Value>>(mut self, name: &str, values: Vec<T>) -> Self {
        if !values.is_empty() {
            let items: Vec<Value> = values.into_iter().map(Into::into).collect();
            self.0.insert(name.into(), Value::Array(items));
        }
        self
    }

    fn map(mut self, name: &str, values: BTreeMap<String, String>) -> Self {
        if !values.is_empty() {
            self.0.insert(name.into(), json!(values));
        }
        self
    }

    fn obj(mut self, name: &str, value: Option<Obj>) -> Self {
        if let Some(v) = value {
            self.0.insert(name.into(), Value::Object(v));
        }
        self
    }

    fn objs(mut self, name: &str, values: Vec<Obj>) -> Self {
        if !values.is_empty() {
            let items: Vec<Value> = values.into_iter().map(Value::Object).collect();
            self.0.insert(name.into(), Value::Array(items));
        }
        self
    }

    fn done(self) -> Obj {
        self.0
    }
}

/// Converts each element, stopping at the first error.
fn each<T>(items: Vec<T>, f: impl Fn(T) -> Result<Obj, ApiError>) -> Result<Vec<Obj>, ApiError> {
    items.into_iter().map(f).collect()
}

/// Converts an optional message.
fn maybe<T>(
    item: Option<T>,
    f: impl Fn(T) -> Result<Obj, ApiError>,
) -> Result<Option<Obj>, ApiError> {
    item.map(f).transpose()
}

/// `metav1.Time`: seconds and nanoseconds since the epoch, as RFC 3339 in JSON. Go encodes
/// the zero time (what kubectl's generators leave in every `creationTimestamp`) as an empty
/// message, and JSON as null: both are unset here.
fn time(t: Option<meta::Time>) -> Option<String> {
    let secs = u64::try_from(t?.seconds?).ok().filter(|s| *s > 0)?;
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    Some(humantime::format_rfc3339_seconds(at).to_string())
}

/// `intstr.IntOrString`: a number or a string in JSON.
fn int_or_string(v: Option<IntOrString>) -> Option<Value> {
    let IntOrString {
        r#type,
        int_val,
        str_val,
    } = v?;
    Some(match r#type {
        Some(1) => json!(str_val.unwrap_or_default()),
        _ => json!(int_val.unwrap_or_default()),
    })
}

fn quantities(values: BTreeMap<String, Quantity>) -> Option<Obj> {
    if values.is_empty() {
        return None;
    }
    Some(
        values
            .into_iter()
            .map(|(k, q)| (k, json!(q.string.unwrap_or_default())))
            .collect(),
    )
}

fn object_meta(m: Option<meta::ObjectMeta>) -> Result<Option<Obj>, ApiError> {
    let Some(meta::ObjectMeta {
        name,
        generate_name,
        namespace,
        self_link,
        uid,
        resource_version,
        generation,
        creation_timestamp,
        deletion_timestamp,
        deletion_grace_period_seconds,
        labels,
        annotations,
        owner_references,
        finalizers,
        managed_fields,
    }) = m
    else {
        return Ok(None);
    };
    // Go writes every string field, so an unset selfLink arrives as "".
    let self_link = self_link.filter(|s| !s.is_empty());
    refuse_set!("metadata"; self_link, managed_fields);
    let owners = each(owner_references, |o| {
        let meta::OwnerReference {
            api_version,
            kind,
            name,
            uid,
            controller,
            block_owner_deletion,
        } = o;
        Ok(Fields::new()
            .opt("apiVersion", api_version)
            .opt("kind", kind)
            .opt("name", name)
            .opt("uid", uid)
            .opt("controller", controller)
            .opt("blockOwnerDeletion", block_owner_deletion)
            .done())
    })?;
    Ok(Some(
        Fields::new()
            .opt("name", name)
            .opt("generateName", generate_name)
            .opt("namespace", namespace)
            .opt("uid", uid)
            .opt("resourceVersion", resource_version)
            .nz("generation", generation)
            .opt("creationTimestamp", time(creation_timestamp))
            .opt("deletionTimestamp", time(deletion_timestamp))
            .opt("deletionGracePeriodSeconds", deletion_grace_period_seconds)
            .map("labels", labels)
            .map("annotations", annotations)
            .objs("ownerReferences", owners)
            .list("finalizers", finalizers)
            .done(),
    ))
}

fn label_selector(s: Option<meta::LabelSelector>) -> Result<Option<Obj>, ApiError> {
    maybe(s, |s| {
        let meta::LabelSelector {
            match_labels,
            match_expressions,
        } = s;
        let expressions = each(match_expressions, |e| {
            let meta::LabelSelectorRequirement {
                key,
                operator,
                values,
            } = e;
            Ok(Fields::new()
                .opt("key", key)
                .opt("operator", operator)
                .list("values", values)
                .done())
        })?;
        Ok(Fields::new()
            .map("matchLabels", match_labels)
            .objs("matchExpressions", expressions)
            .done())
    })
}

fn namespace(ns: core::Namespace) -> Result<Obj, ApiError> {
    // `status` is the server's to write; a create or update through the main resource ignores it.
    let core::Namespace {
        metadata,
        spec,
        status: _,
    } = ns;
    let spec = maybe(spec, |s| {
        let core::NamespaceSpec { finalizers } = s;
        Ok(Fields::new().list("finalizers", finalizers).done())
    })?;
    Ok(Fields::new()
        .obj("metadata", object_meta(metadata)?)
        .obj("spec", spec)
        .done())
}

fn config_map(cm: core::ConfigMap) -> Result<Obj, ApiError> {
    let core::ConfigMap {
        metadata,
        immutable,
        data,
        binary_data,
    } = cm;
    Ok(Fields::new()
        .obj("metadata", object_meta(metadata)?)
        .opt("immutable", immutable)
        .map("data", data)
        .map("binaryData", base64_values(binary_data))
        .done())
}

fn base64_values(values: BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    values
        .into_iter()
        .map(|(k, v)| (k, b64.encode(v)))
        .collect()
}

fn secret(s: core::Secret) -> Result<Obj, ApiError> {
    let core::Secret {
        metadata,
        immutable,
        data,
        string_data,
        r#type,
    } = s;
    Ok(Fields::new()
        .obj("metadata", object_meta(metadata)?)
        .opt("immutable", immutable)
        .map("data", base64_values(data))
        .map("stringData", string_data)
        .opt("type", r#type)
        .done())
}

fn local_ref(r: core::LocalObjectReference) -> Result<Obj, ApiError> {
    let core::LocalObjectReference { name } = r;
    Ok(Fields::new().opt("name", name).done())
}

fn service_account(sa: core::ServiceAccount) -> Result<Obj, ApiError> {
    let core::ServiceAccount {
        metadata,
        secrets,
        image_pull_secrets,
        automount_service_account_token,
    } = sa;
    let secrets = each(secrets, |r| {
        let core::ObjectReference {
            kind,
            namespace,
            name,
            uid,
            api_version,
            resource_version,
            field_path,
        } = r;
        Ok(Fields::new()
            .opt("kind", kind)
            .opt("namespace", namespace)
            .opt("name", name)
            .opt("uid", uid)
            .opt("apiVersion", api_version)
            .opt("resourceVersion", resource_version)
            .opt("fieldPath", field_path)
            .done())
    })?;
    Ok(Fields::new()
        .obj("metadata", object_meta(metadata)?)
        .objs("secrets", secrets)
        .objs("imagePullSecrets", each(image_pull_secrets, local_ref)?)
        .opt(
            "automountServiceAccountToken",
            automount_service_account_token,
        )
        .done())
}

fn service(svc: core::Service) -> Result<Obj, ApiError> {
    let core::Service {
        metadata,
        spec,
        status: _,
    } = svc;
    let spec = maybe(spec, |s| {
        let core::ServiceSpec {
            ports,
            selector,
            cluster_ip,
            cluster_ips,
            r#type,
            external_ips,
            session_affinity,
            load_balancer_ip,
            load_balancer_source_ranges,
            external_name,
            external_traffic_policy,
            health_check_node_port,
            publish_not_ready_addresses,
            session_affinity_config,
            ip_families,
            ip_family_policy,
            allocate_load_balancer_node_ports,
            load_balancer_class,
            internal_traffic_policy,
            traffic_distribution,
        } = s;
        refuse_set!("spec"; session_affinity_config);
        let ports = each(ports, |p| {
            let core::ServicePort {
                name,
                protocol,
                app_protocol,
                port,
                target_port,
                node_port,
            } = p;
            Ok(Fields::new()
                .opt("name", name)
                .opt("protocol", protocol)
                .opt("appProtocol", app_protocol)
                .opt("port", port)
                .opt("targetPort", int_or_string(target_port))
                .nz("nodePort", node_port)
                .done())
        })?;
        Ok(Fields::new()
            .objs("ports", ports)
            .map("selector", selector)
            .opt("clusterIP", cluster_ip)
            .list("clusterIPs", cluster_ips)
            .opt("type", r#type)
            .list("externalIPs", external_ips)
            .opt("sessionAffinity", session_affinity)
            .opt("loadBalancerIP", load_balancer_ip)
            .list("loadBalancerSourceRanges", load_balancer_source_ranges)
            .opt("externalName", external_name)
            .opt("externalTrafficPolicy", external_traffic_policy)
            .nz("healthCheckNodePort", health_check_node_port)
            .nz("publishNotReadyAddresses", publish_not_ready_addresses)
            .list("ipFamilies", ip_families)
            .opt("ipFamilyPolicy", ip_family_policy)
            .opt(
                "allocateLoadBalancerNodePorts",
                allocate_load_balancer_node_ports,
            )
            .opt("loadBalancerClass", load_balancer_class)
            .opt("internalTrafficPolicy", internal_traffic_policy)
            .opt("trafficDistribution", traffic_distribution)
            .done())
    })?;
    Ok(Fields::new()
        .obj("metadata", object_meta(metadata)?)
        .obj("spec", spec)
        .done())
}

fn pod_template(t: Option<core::PodTemplateSpec>) -> Result<Option<Obj>, ApiError> {
    maybe(t, |t| {
        let core::PodTemplateSpec { metadata, spec } = t;
        Ok(Fields::new()
            .obj("metadata", object_meta(metadata)?)
            .obj("spec", maybe(spec, pod_spec)?)
            .done())
    })
}

fn pod_spec(s: core::PodSpec) -> Result<Obj, ApiError> {
    let core::PodSpec {
        volumes,
        init_containers,
        containers,
        ephemeral_containers,
        restart_policy,
        termination_grace_period_seconds,
        active_deadline_seconds,
        dns_policy,
        node_selector,
        service_account_name,
        service_account,
        automount_service_account_token,
        node_name,
        host_network,
        host_pid,
        host_ipc,
        share_process_namespace,
        security_context,
        image_pull_secrets,
        hostname,
        subdomain,
        affinity,
        scheduler_name,
        tolerations,
        host_aliases,
        priority_class_name,
        priority,
        dns_config,
        readiness_gates,
        runtime_class_name,
        enable_service_links,
        preemption_policy,
        overhead,
        topology_spread_constraints,
        set_hostname_as_fqdn,
        os,
        host_users,
        scheduling_gates,
        resource_claims,
        resources,
    } = s;
    refuse_set!("spec.template.spec";
        volumes, ephemeral_containers, security_context, affinity, tolerations, host_aliases,
        dns_config, readiness_gates, overhead, topology_spread_constraints, os,
        scheduling_gates, resource_claims, resources);
    Ok(Fields::new()
        .objs("initContainers", each(init_containers, container)?)
        .objs("containers", each(containers, container)?)
        .opt("restartPolicy", restart_policy)
        .opt(
            "terminationGracePeriodSeconds",
            termination_grace_period_seconds,
        )
        .opt("activeDeadlineSeconds", active_deadline_seconds)
        .opt("dnsPolicy", dns_policy)
        .map("nodeSelector", node_selector)
        .opt("serviceAccountName", service_account_name)
        .opt("serviceAccount", service_account)
        .opt(
            "automountServiceAccountToken",
            automount_service_account_token,
        )
        .opt("nodeName", node_name)
        .nz("hostNetwork", host_network)
        .nz("hostPID", host_pid)
        .nz("hostIPC", host_ipc)
        .opt("shareProcessNamespace", share_process_namespace)
        .objs("imagePullSecrets", each(image_pull_secrets, local_ref)?)
        .opt("hostname", hostname)
        .opt("subdomain", subdomain)
        .opt("schedulerName", scheduler_name)
        .opt("priorityClassName", priority_class_name)
        .opt("priority", priority)
        .opt("runtimeClassName", runtime_class_name)
        .opt("enableServiceLinks", enable_service_links)
        .opt("preemptionPolicy", preemption_policy)
        .opt("setHostnameAsFQDN", set_hostname_as_fqdn)
        .opt("hostUsers", host_users)
        .done())
}

fn container(c: core::Container) -> Result<Obj, ApiError> {
    let core::Container {
        name,
        image,
        command,
        args,
        working_dir,
        ports,
        env_from,
        env,
        resources,
        resize_policy,
        restart_policy,
        volume_mounts,
        volume_devices,
        liveness_probe,
        readiness_probe,
        startup_probe,
        lifecycle,
        termination_message_path,
        termination_message_policy,
        image_pull_policy,
        security_context,
        stdin,
        stdin_once,
        tty,
    } = c;
    let path = "spec.template.spec.containers[]";
    refuse_set!(path;
        env_from, resize_policy, volume_mounts, volume_devices,
        liveness_probe, readiness_probe, startup_probe, lifecycle, security_context);
    let ports = each(ports, |p| {
        let core::ContainerPort {
            name,
            host_port,
            container_port,
            protocol,
            host_ip,
        } = p;
        Ok(Fields::new()
            .opt("name", name)
            .nz("hostPort", host_port)
            .opt("containerPort", container_port)
            .opt("protocol", protocol)
            .opt("hostIP", host_ip)
            .done())
    })?;
    let env = each(env, |e| {
        let core::EnvVar {
            name,
            value,
            value_from,
        } = e;
        refuse_set!(format!("{path}.env[]"); value_from);
        Ok(Fields::new().opt("name", name).opt("value", value).done())
    })?;
    let resources = maybe(resources, |r| {
        let core::ResourceRequirements {
            limits,
            requests,
            claims,
        } = r;
        refuse_set!(format!("{path}.resources"); claims);
        Ok(Fields::new()
            .obj("limits", quantities(limits))
            .obj("requests", quantities(requests))
            .done())
    })?;
    Ok(Fields::new()
        .opt("name", name)
        .opt("image", image)
        .list("command", command)
        .list("args", args)
        .opt("workingDir", working_dir)
        .objs("ports", ports)
        .objs("env", env)
        .obj("resources", resources)
        .opt("restartPolicy", restart_policy)
        .opt("terminationMessagePath", termination_message_path)
        .opt("terminationMessagePolicy", termination_message_policy)
        .opt("imagePullPolicy", image_pull_policy)
        .nz("stdin", stdin)
        .nz("stdinOnce", stdin_once)
        .nz("tty", tty)
        .done())
}

fn deployment(d: apps::Deployment) -> Result<Obj, ApiError> {
    let apps::Deployment {
        metadata,
        spec,
        status: _,
    } = d;
    let spec = maybe(spec, |s| {
        let apps::DeploymentSpec {
            replicas,
            selector,
            template,
            strategy,
            min_ready_seconds,
            revision_history_limit,
            paused,
            progress_deadline_seconds,
        } = s;
        let strategy = maybe(strategy, |s| {
            let apps::DeploymentStrategy {
                r#type,
                rolling_update,
            } = s;
            let rolling = maybe(rolling_update, |r| {
                let apps::RollingUpdateDeployment {
                    max_unavailable,
                    max_surge,
                } = r;
                Ok(Fields::new()
                    .opt("maxUnavailable", int_or_string(max_unavailable))
                    .opt("maxSurge", int_or_string(max_surge))
                    .done())
            })?;
            Ok(Fields::new()
                .opt("type", r#type)
                .obj("rollingUpdate", rolling)
                .done())
        })?;
        Ok(Fields::new()
            .opt("replicas", replicas)
            .obj("selector", label_selector(selector)?)
            .obj("template", pod_template(template)?)
            .obj("strategy", strategy)
            .nz("minReadySeconds", min_ready_seconds)
            .opt("revisionHistoryLimit", revision_history_limit)
            .nz("paused", paused)
            .opt("progressDeadlineSeconds", progress_deadline_seconds)
            .done())
    })?;
    Ok(Fields::new()
        .obj("metadata", object_meta(metadata)?)
        .obj("spec", spec)
        .done())
}

fn job_spec(s: batch::JobSpec) -> Result<Obj, ApiError> {
    let batch::JobSpec {
        parallelism,
        completions,
        active_deadline_seconds,
        pod_failure_policy,
        success_policy,
        backoff_limit,
        backoff_limit_per_index,
        max_failed_indexes,
        selector,
        manual_selector,
        template,
        ttl_seconds_after_finished,
        completion_mode,
        suspend,
        pod_replacement_policy,
        managed_by,
    } = s;
    refuse_set!("spec"; pod_failure_policy, success_policy);
    Ok(Fields::new()
        .opt("parallelism", parallelism)
        .opt("completions", completions)
        .opt("activeDeadlineSeconds", active_deadline_seconds)
        .opt("backoffLimit", backoff_limit)
        .opt("backoffLimitPerIndex", backoff_limit_per_index)
        .opt("maxFailedIndexes", max_failed_indexes)
        .obj("selector", label_selector(selector)?)
        .opt("manualSelector", manual_selector)
        .obj("template", pod_template(template)?)
        .opt("ttlSecondsAfterFinished", ttl_seconds_after_finished)
        .opt("completionMode", completion_mode)
        .opt("suspend", suspend)
        .opt("podReplacementPolicy", pod_replacement_policy)
        .opt("managedBy", managed_by)
        .done())
}

fn job(j: batch::Job) -> Result<Obj, ApiError> {
    let batch::Job {
        metadata,
        spec,
        status: _,
    } = j;
    Ok(Fields::new()
        .obj("metadata", object_meta(metadata)?)
        .obj("spec", maybe(spec, job_spec)?)
        .done())
}

fn cron_job(c: batch::CronJob) -> Result<Obj, ApiError> {
    let batch::CronJob {
        metadata,
        spec,
        status: _,
    } = c;
    let spec = maybe(spec, |s| {
        let batch::CronJobSpec {
            schedule,
            time_zone,
            starting_deadline_seconds,
            concurrency_policy,
            suspend,
            job_template,
            successful_jobs_history_limit,
            failed_jobs_history_limit,
        } = s;
        let template = maybe(job_template, |t| {
            let batch::JobTemplateSpec { metadata, spec } = t;
            Ok(Fields::new()
                .obj("metadata", object_meta(metadata)?)
                .obj("spec", maybe(spec, job_spec)?)
                .done())
        })?;
        Ok(Fields::new()
            .opt("schedule", schedule)
            .opt("timeZone", time_zone)
            .opt("startingDeadlineSeconds", starting_deadline_seconds)
            .opt("concurrencyPolicy", concurrency_policy)
            .opt("suspend", suspend)
            .obj("jobTemplate", template)
            .opt("successfulJobsHistoryLimit", successful_jobs_history_limit)
            .opt("failedJobsHistoryLimit", failed_jobs_history_limit)
            .done())
    })?;
    Ok(Fields::new()
        .obj("metadata", object_meta(metadata)?)
        .obj("spec", spec)
        .done())
}

fn policy_rule(r: rbac::PolicyRule) -> Result<Obj, ApiError> {
    let rbac::PolicyRule {
        verbs,
        api_groups,
        resources,
        resource_names,
        non_resource_ur_ls,
    } = r;
    Ok(Fields::new()
        .list("verbs", verbs)
        .list("apiGroups", api_groups)
        .list("resources", resources)
        .list("resourceNames", resource_names)
        .list("nonResourceURLs", non_resource_ur_ls)
        .done())
}

fn role(r: rbac::Role) -> Result<Obj, ApiError> {
    let rbac::Role { metadata, rules } = r;
    Ok(Fields::new()
        .obj("metadata", object_meta(metadata)?)
        .objs("rules", each(rules, policy_rule)?)
        .done())
}

fn cluster_role(r: rbac::ClusterRole) -> Result<Obj, ApiError> {
    let rbac::ClusterRole {
        metadata,
        rules,
        aggregation_rule,
    } = r;
    let aggregation = maybe(aggregation_rule, |a| {
        let rbac::AggregationRule {
            cluster_role_selectors,
        } = a;
        let selectors: Vec<Obj> = cluster_role_selectors
            .into_iter()
            .map(|s| label_selector(Some(s)).map(Option::unwrap_or_default))
            .collect::<Result<_, _>>()?;
        Ok(Fields::new().objs("clusterRoleSelectors", selectors).done())
    })?;
    Ok(Fields::new()
        .obj("metadata", object_meta(metadata)?)
        .objs("rules", each(rules, policy_rule)?)
        .obj("aggregationRule", aggregation)
        .done())
}

fn binding(
    metadata: Option<meta::ObjectMeta>,
    subjects: Vec<rbac::Subject>,
    role_ref: Option<rbac::RoleRef>,
) -> Result<Obj, ApiError> {
    let subjects = each(subjects, |s| {
        let rbac::Subject {
            kind,
            api_group,
            name,
            namespace,
        } = s;
        Ok(Fields::new()
            .opt("kind", kind)
            .opt("apiGroup", api_group)
            .opt("name", name)
            .opt("namespace", namespace)
            .done())
    })?;
    let role_ref = maybe(role_ref, |r| {
        let rbac::RoleRef {
            api_group,
            kind,
            name,
        } = r;
        Ok(Fields::new()
            .opt("apiGroup", api_group)
            .opt("kind", kind)
            .opt("name", name)
            .done())
    })?;
    Ok(Fields::new()
        .obj("metadata", object_meta(metadata)?)
        .objs("subjects", subjects)
        .obj("roleRef", role_ref)
        .done())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let unknown = Unknown {
            type_meta: Some(k8s_pb::apimachinery::pkg::runtime::TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut body = MAGIC.to_vec();
        body.extend(unknown.encode_to_vec());
        body
    }

    fn named(name: &str) -> Option<meta::ObjectMeta> {
        Some(meta::ObjectMeta {
            name: Some(name.into()),
            labels: BTreeMap::from([("app".into(), name.into())]),
            ..Default::default()
        })
    }

    #[test]
    fn a_deployment_as_kubectl_create_sends_it_decodes_to_its_json() {
        let container = core::Container {
            name: Some("web".into()),
            image: Some("nginx".into()),
            ports: vec![core::ContainerPort {
                container_port: Some(80),
                ..Default::default()
            }],
            resources: Some(core::ResourceRequirements {
                limits: BTreeMap::from([(
                    "memory".into(),
                    Quantity {
                        string: Some("64Mi".into()),
                    },
                )]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let d = apps::Deployment {
            metadata: named("web"),
            spec: Some(apps::DeploymentSpec {
                replicas: Some(2),
                selector: Some(meta::LabelSelector {
                    match_labels: BTreeMap::from([("app".into(), "web".into())]),
                    ..Default::default()
                }),
                template: Some(core::PodTemplateSpec {
                    metadata: named("web"),
                    spec: Some(core::PodSpec {
                        containers: vec![container],
                        ..Default::default()
                    }),
                }),
                strategy: Some(apps::DeploymentStrategy::default()),
                ..Default::default()
            }),
            status: Some(apps::DeploymentStatus::default()),
        };
        let got = decode(&envelope("apps/v1", "Deployment", d.encode_to_vec())).unwrap();
        assert_eq!(
            got,
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "labels": {"app": "web"}},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": {"app": "web"}},
                    "strategy": {},
                    "template": {
                        "metadata": {"name": "web", "labels": {"app": "web"}},
                        "spec": {"containers": [{
                            "name": "web", "image": "nginx",
                            "ports": [{"containerPort": 80}],
                            "resources": {"limits": {"memory": "64Mi"}}
                        }]}
                    }
                }
            })
        );
    }

    #[test]
    fn secret_bytes_become_base64_and_service_target_ports_int_or_string() {
        let s = core::Secret {
            metadata: named("creds"),
            data: BTreeMap::from([("password".into(), b"hunter2".to_vec())]),
            r#type: Some("Opaque".into()),
            ..Default::default()
        };
        let got = decode(&envelope("v1", "Secret", s.encode_to_vec())).unwrap();
        assert_eq!(got["data"]["password"], json!("aHVudGVyMg=="));
        assert_eq!(got["type"], json!("Opaque"));

        let svc = core::Service {
            metadata: named("web"),
            spec: Some(core::ServiceSpec {
                ports: vec![
                    core::ServicePort {
                        port: Some(80),
                        target_port: Some(IntOrString {
                            r#type: Some(0),
                            int_val: Some(8080),
                            str_val: None,
                        }),
                        ..Default::default()
                    },
                    core::ServicePort {
                        port: Some(443),
                        target_port: Some(IntOrString {
                            r#type: Some(1),
                            int_val: None,
                            str_val: Some("https".into()),
                        }),
                        ..Default::default()
                    },
                ],
                r#type: Some("ClusterIP".into()),
                ..Default::default()
            }),
            status: None,
        };
        let got = decode(&envelope("v1", "Service", svc.encode_to_vec())).unwrap();
        assert_eq!(got["spec"]["ports"][0]["targetPort"], json!(8080));
        assert_eq!(got["spec"]["ports"][1]["targetPort"], json!("https"));
    }

    #[test]
    fn a_field_the_lab_does_not_translate_is_refused_by_name_not_dropped() {
        let d = apps::Deployment {
            metadata: named("web"),
            spec: Some(apps::DeploymentSpec {
                template: Some(core::PodTemplateSpec {
                    metadata: None,
                    spec: Some(core::PodSpec {
                        volumes: vec![core::Volume {
                            name: Some("data".into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
            status: None,
        };
        let err = decode(&envelope("apps/v1", "Deployment", d.encode_to_vec())).unwrap_err();
        assert_eq!(err.code, 415);
        assert!(
            err.message.contains("spec.template.spec.volumes"),
            "{}",
            err.message
        );
    }

    #[test]
    fn other_kinds_and_bodies_without_the_magic_are_refused() {
        let err = decode(&envelope("v1", "Pod", vec![])).unwrap_err();
        assert_eq!(err.code, 415);
        assert!(err.message.contains("v1 Pod"), "{}", err.message);
        let err = decode(b"{}").unwrap_err();
        assert_eq!(err.code, 400);
    }

    #[test]
    fn json_names_follow_the_api_convention() {
        assert_eq!(json_name("image_pull_policy"), "imagePullPolicy");
        assert_eq!(json_name("r#type"), "type");
        assert_eq!(json_name("volumes"), "volumes");
    }
}
