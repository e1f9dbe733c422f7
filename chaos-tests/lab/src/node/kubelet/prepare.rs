//! Preparing a pod to run: its volumes' host paths (PVCs, emptyDir, configMap and secret
//! files, projected tokens), each container's mounts, probes and environment.

use super::*;

/// The host directory of one of the pod's volumes, created if needed.
pub(super) async fn volume_host_path(
    ctx: &NodeContext,
    pod: &Pod,
    pod_dir: &Path,
    volume: &k8s_openapi::api::core::v1::Volume,
    tokens: &mut Vec<TokenFile>,
) -> Result<(PathBuf, bool), PodError> {
    let ns = pod.namespace().unwrap_or_default();
    let err = |reason: String| PodError::Volume {
        volume: volume.name.clone(),
        reason,
    };
    let files_dir = pod_dir.join("volumes").join(&volume.name);
    let write_files = |files: BTreeMap<String, Vec<u8>>| -> Result<(PathBuf, bool), PodError> {
        std::fs::create_dir_all(&files_dir).map_err(|source| PodError::Files {
            path: files_dir.clone(),
            source,
        })?;
        for (k, v) in files {
            let p = files_dir.join(k);
            std::fs::write(&p, v).map_err(|source| PodError::Files {
                path: p.clone(),
                source,
            })?;
        }
        Ok((files_dir.clone(), false))
    };
    if let Some(pvc) = &volume.persistent_volume_claim {
        let found = crate::node::storage::volume_path(&ctx.client, &ns, &pvc.claim_name)
            .await
            .map_err(|e| err(e.to_string()))?;
        let (path, mode) = found.ok_or_else(|| {
            err(format!(
                "persistentvolumeclaim {:?} is not bound",
                pvc.claim_name
            ))
        })?;
        return Ok((path, mode == crate::node::storage::VolumeMode::Block));
    }
    if volume.empty_dir.is_some() {
        std::fs::create_dir_all(&files_dir).map_err(|source| PodError::Files {
            path: files_dir.clone(),
            source,
        })?;
        return Ok((files_dir, false));
    }
    if let Some(cm) = &volume.config_map {
        let name = cm.name.clone();
        let found = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&name)
            .await
            .map_err(|e| err(e.to_string()))?;
        let cm = found.ok_or_else(|| err(format!("configmap {name:?} not found")))?;
        return write_files(
            cm.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect(),
        );
    }
    if let Some(secret) = &volume.secret {
        let name = secret.secret_name.clone().unwrap_or_default();
        let found = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&name)
            .await
            .map_err(|e| err(e.to_string()))?;
        let s = found.ok_or_else(|| err(format!("secret {name:?} not found")))?;
        let mut files: BTreeMap<String, Vec<u8>> = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        files.extend(
            s.string_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes())),
        );
        return write_files(files);
    }
    if let Some(source) = &volume.projected {
        tokens.extend(
            projected::fill(ctx, pod, source, &files_dir)
                .await
                .map_err(err)?,
        );
        return Ok((files_dir, false));
    }
    if let Some(hp) = &volume.host_path {
        return Ok((PathBuf::from(&hp.path), false));
    }
    Err(err("volume type not supported by the lab (persistentVolumeClaim, emptyDir, configMap, secret, projected, hostPath are)".into()))
}

/// Resolves env, volumes, image and identity for each container of the pod.
/// A pod's containers, ready to start.
pub(super) struct PreparedPod {
    /// `initContainers`, in order.
    pub(super) init: Vec<Prepared>,
    /// `containers`.
    pub(super) main: Vec<Prepared>,
    /// Projected service-account tokens to keep fresh while the pod runs.
    pub(super) tokens: Vec<TokenFile>,
}

pub(super) async fn prepare(ctx: &NodeContext, pod: &Pod) -> Result<PreparedPod, PodError> {
    let spec = pod.spec.clone().unwrap_or_default();
    let ns = pod.namespace().unwrap_or_default();
    let pod_dir = ctx.pods_dir().join(format!(
        "{ns}_{}_{}",
        pod.name_any(),
        pod.uid().unwrap_or_default()
    ));
    std::fs::create_dir_all(&pod_dir).map_err(|source| PodError::Files {
        path: pod_dir.clone(),
        source,
    })?;
    let mut volumes: BTreeMap<String, (PathBuf, bool)> = BTreeMap::new();
    let mut tokens = Vec::new();
    for v in spec.volumes.iter().flatten() {
        volumes.insert(
            v.name.clone(),
            volume_host_path(ctx, pod, &pod_dir, v, &mut tokens).await?,
        );
    }
    let pod_sc = spec.security_context.clone().unwrap_or_default();
    if let (Some(fs_group), true) = (pod_sc.fs_group, is_root()) {
        let on_root_mismatch = pod_sc.fs_group_change_policy.as_deref() == Some("OnRootMismatch");
        for (path, _) in volumes.values() {
            // With OnRootMismatch, a volume whose root already has the group and the group
            // permissions is left alone, as the kubelet does (PostgreSQL needs its 0700 PGDATA).
            if on_root_mismatch && root_matches_fs_group(path, fs_group) {
                continue;
            }
            // fsGroup: the volume's group becomes fsGroup and is group-writable.
            let _ = std::process::Command::new("chgrp")
                .arg("-R")
                .arg(fs_group.to_string())
                .arg(path)
                .status();
            let _ = std::process::Command::new("chmod")
                .arg("-R")
                .arg("g+rwX")
                .arg(path)
                .status();
        }
    }
    let mut out = PreparedPod {
        init: Vec::new(),
        main: Vec::new(),
        tokens,
    };
    for c in spec.init_containers.iter().flatten() {
        out.init
            .push(prepare_container(ctx, pod, &pod_dir, c, &volumes, &pod_sc).await?);
    }
    for c in &spec.containers {
        out.main
            .push(prepare_container(ctx, pod, &pod_dir, c, &volumes, &pod_sc).await?);
    }
    Ok(out)
}

/// Whether the volume root at `path` already belongs to group `fs_group` with group rwx.
pub(super) fn root_matches_fs_group(path: &std::path::Path, fs_group: i64) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| i64::from(m.gid()) == fs_group && m.mode() & 0o070 == 0o070)
        .unwrap_or(false)
}

pub(super) async fn prepare_container(
    ctx: &NodeContext,
    pod: &Pod,
    pod_dir: &Path,
    c: &Container,
    volumes: &BTreeMap<String, (PathBuf, bool)>,
    pod_sc: &k8s_openapi::api::core::v1::PodSecurityContext,
) -> Result<Prepared, PodError> {
    let launch = ctx
        .catalog
        .resolve(
            c.image.as_deref().unwrap_or_default(),
            c.command.as_deref().unwrap_or_default(),
            c.args.as_deref().unwrap_or_default(),
        )
        .map_err(|source| PodError::Image {
            container: c.name.clone(),
            source,
        })?;
    let mut mounts = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let (host, _) = volumes.get(&m.name).ok_or_else(|| PodError::Volume {
            volume: m.name.clone(),
            reason: "no such volume in the pod".into(),
        })?;
        let host = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => {
                let p = host.join(sub);
                std::fs::create_dir_all(&p).map_err(|source| PodError::Files {
                    path: p.clone(),
                    source,
                })?;
                p
            }
            None => host.clone(),
        };
        mounts.push(Mount {
            host,
            path: m.mount_path.clone(),
            read_only: m.read_only.unwrap_or(false),
            device: false,
        });
    }
    for d in c.volume_devices.iter().flatten() {
        let (host, _) = volumes.get(&d.name).ok_or_else(|| PodError::Volume {
            volume: d.name.clone(),
            reason: "no such volume in the pod".into(),
        })?;
        mounts.push(Mount {
            host: host.clone(),
            path: d.device_path.clone(),
            read_only: false,
            device: true,
        });
    }
    let env = container_env(ctx, pod, c).await?;
    let env = if is_root() {
        env
    } else {
        rewrite_mount_paths(env, &mounts)
    };
    let sc = c.security_context.clone().unwrap_or_default();
    let uid = sc.run_as_user.or(pod_sc.run_as_user);
    let gid = sc.run_as_group.or(pod_sc.run_as_group);
    Ok(Prepared {
        name: c.name.clone(),
        launch,
        env,
        mounts,
        working_dir: c.working_dir.clone(),
        run_as: uid.map(|u| (u, gid)),
        log: pod_dir.join(format!("{}.log", c.name)),
        sidecar: c.restart_policy.as_deref() == Some("Always"),
        readiness: container_probe(c, c.readiness_probe.as_ref(), ctx.ip),
        liveness: container_probe(c, c.liveness_probe.as_ref(), ctx.ip),
        image_program: ctx
            .catalog
            .image_program(c.image.as_deref().unwrap_or_default()),
    })
}

/// A container's probe as the lab runs it; one it cannot run (`grpc`, a port the container
/// lacks) is logged and left out, so it neither gates readiness nor restarts the container.
pub(super) fn container_probe(
    c: &Container,
    probe: Option<&k8s_openapi::api::core::v1::Probe>,
    pod_ip: std::net::IpAddr,
) -> Option<probes::ProbeSpec> {
    probes::ProbeSpec::new(probe?, c, pod_ip)
        .map_err(|reason| warn!(container = %c.name, %reason, "probe not run by the lab"))
        .ok()
}

/// Without mount namespaces, values naming a path under a mountPath point at the host path.
pub(super) fn rewrite_mount_paths(
    env: BTreeMap<String, String>,
    mounts: &[Mount],
) -> BTreeMap<String, String> {
    env.into_iter()
        .map(|(k, v)| {
            let rewritten = mounts
                .iter()
                .filter(|m| {
                    v == m.path || v.starts_with(&format!("{}/", m.path.trim_end_matches('/')))
                })
                .max_by_key(|m| m.path.len())
                .map(|m| {
                    format!(
                        "{}{}",
                        m.host.to_string_lossy(),
                        &v[m.path.trim_end_matches('/').len()..]
                    )
                });
            (k, rewritten.unwrap_or(v))
        })
        .collect()
}

/// The container's environment: `env` (values, fieldRef, configMapKeyRef, secretKeyRef),
/// `envFrom`, plus `POD_IP` and how to reach the API server: `KUBECONFIG` for the site on
/// the lab's control plane, `KUBERNETES_SERVICE_HOST`/`PORT` on a real one.
pub(super) async fn container_env(
    ctx: &NodeContext,
    pod: &Pod,
    c: &Container,
) -> Result<BTreeMap<String, String>, PodError> {
    let ns = pod.namespace().unwrap_or_default();
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let env_err = |name: &str, reason: String| PodError::Volume {
        volume: format!("env {name}"),
        reason,
    };
    let mut env = BTreeMap::new();
    match ctx.control_plane {
        // The lab's API server has no identities: pods use the site's kubeconfig.
        ControlPlane::Lab => {
            env.insert(
                "KUBECONFIG".to_string(),
                ctx.kubeconfig.to_string_lossy().into_owned(),
            );
        }
        // Pods find the API server as in a cluster and act under their ServiceAccount
        // through the token projected into them (see `projected`).
        ControlPlane::Kubernetes => {
            let (host, port) = (ctx.api.ip().to_string(), ctx.api.port().to_string());
            env.insert("KUBERNETES_SERVICE_HOST".into(), host);
            env.insert("KUBERNETES_SERVICE_PORT".into(), port.clone());
            env.insert("KUBERNETES_SERVICE_PORT_HTTPS".into(), port);
        }
    }
    env.insert("POD_IP".to_string(), ctx.ip.to_string());
    env.insert("HOSTNAME".to_string(), pod.name_any());
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            if let Ok(cm) = cms.get(&r.name).await {
                env.extend(
                    cm.data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (format!("{prefix}{k}"), v)),
                );
            }
        }
        if let Some(r) = &from.secret_ref {
            if let Ok(s) = secrets.get(&r.name).await {
                env.extend(s.data.unwrap_or_default().into_iter().map(|(k, v)| {
                    (
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(&v.0).into_owned(),
                    )
                }));
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                if let Some(f) = &from.field_ref {
                    match f.field_path.as_str() {
                        "metadata.name" => pod.name_any(),
                        "metadata.namespace" => ns.clone(),
                        "metadata.uid" => pod.uid().unwrap_or_default(),
                        "spec.nodeName" => ctx.node_name.clone(),
                        "status.podIP" | "status.hostIP" => ctx.ip.to_string(),
                        other => {
                            return Err(env_err(
                                &e.name,
                                format!("fieldRef {other} is not supported by the lab"),
                            ))
                        }
                    }
                } else if let Some(k) = &from.config_map_key_ref {
                    // `optional: true`: a missing ConfigMap or key leaves the variable unset.
                    let optional = k.optional == Some(true);
                    let value = match cms.get_opt(&k.name).await {
                        Ok(cm) => cm.and_then(|cm| cm.data.unwrap_or_default().remove(&k.key)),
                        Err(x) => return Err(env_err(&e.name, x.to_string())),
                    };
                    match value {
                        Some(v) => v,
                        None if optional => continue,
                        None => {
                            return Err(env_err(
                                &e.name,
                                format!("key {} not in configmap {}", k.key, k.name),
                            ))
                        }
                    }
                } else if let Some(k) = &from.secret_key_ref {
                    let optional = k.optional == Some(true);
                    let value = match secrets.get_opt(&k.name).await {
                        Ok(s) => s.and_then(|s| s.data.unwrap_or_default().remove(&k.key)),
                        Err(x) => return Err(env_err(&e.name, x.to_string())),
                    };
                    match value {
                        Some(bytes) => String::from_utf8_lossy(&bytes.0).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(env_err(
                                &e.name,
                                format!("key {} not in secret {}", k.key, k.name),
                            ))
                        }
                    }
                } else {
                    String::new()
                }
            }
            (None, None) => String::new(),
        };
        env.insert(e.name.clone(), expand(&value, &env));
    }
    Ok(env)
}

/// Expands `$(VAR)` references to earlier variables, as the kubelet does.
pub(super) fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = value.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}
