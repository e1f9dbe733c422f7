//! Capture hooks: `spec.hooks.preCapture` runs in every running pod of the app before the
//! volume snapshots are taken, `postCapture` right after they are cut, through the
//! Kubernetes `pods/exec` subresource (as Velero's backup hooks do). A pre-capture hook that
//! fails (non-zero exit, timeout, pod gone) fails the capture; the post-capture hook still
//! runs, so an app the pre-hook half-quiesced is resumed.

use std::time::Duration;

use ferry_schemas::validation::ValidHook;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{AttachParams, ListParams};
use kube::{Api, Client, ResourceExt};
use tokio::io::AsyncReadExt;

/// Which hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookPoint {
    /// `spec.hooks.preCapture`.
    PreCapture,
    /// `spec.hooks.postCapture`.
    PostCapture,
}

impl HookPoint {
    /// The spec field, for messages.
    pub fn field(self) -> &'static str {
        match self {
            HookPoint::PreCapture => "spec.hooks.preCapture",
            HookPoint::PostCapture => "spec.hooks.postCapture",
        }
    }
}

/// Why a hook failed; the message names the field, the pod and the cause.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The app's pods could not be listed.
    #[error("{field}: listing the app's pods: {source}")]
    List {
        /// The hook's field.
        field: &'static str,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The exec failed to start or its stream broke.
    #[error("{field} in pod {pod}: {message}")]
    Exec {
        /// The hook's field.
        field: &'static str,
        /// The pod.
        pod: String,
        /// What went wrong.
        message: String,
    },
    /// The command ran and failed.
    #[error("{field} in pod {pod} failed: {message}; stderr: {stderr}")]
    Failed {
        /// The hook's field.
        field: &'static str,
        /// The pod.
        pod: String,
        /// The Status message (e.g. the exit code).
        message: String,
        /// The end of its standard error.
        stderr: String,
    },
    /// The command did not finish in time.
    #[error("{field} in pod {pod} did not finish within {timeout:?}")]
    Timeout {
        /// The hook's field.
        field: &'static str,
        /// The pod.
        pod: String,
        /// The hook's timeout.
        timeout: Duration,
    },
}

impl HookError {
    /// Stable label for Events and metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            HookError::List { .. } => "list",
            HookError::Exec { .. } => "exec",
            HookError::Failed { .. } => "failed",
            HookError::Timeout { .. } => "timeout",
        }
    }
}

/// Runs `hook` in every running pod of `namespace` that `selector` matches, one pod after the
/// other; returns the pods it ran in.
///
/// # Errors
/// [`HookError`] for the first pod whose hook failed; the remaining pods are not run.
pub async fn run_hook(
    client: &Client,
    namespace: &str,
    selector: &LabelSelector,
    hook: &ValidHook,
    point: HookPoint,
) -> Result<Vec<String>, HookError> {
    let field = point.field();
    let query = ferry_manifests::label_selector_query(selector).map_err(|e| HookError::Exec {
        field,
        pod: String::new(),
        message: format!("spec.selector: {e}"),
    })?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(&query))
        .await
        .map_err(|source| HookError::List { field, source })?;
    let mut ran = Vec::new();
    for pod in list.items {
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        if !running || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = pod.name_any();
        // The API server needs a container name for a pod of several; the hook's default is
        // the pod's first container.
        let container = hook.container.clone().or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .map(|c| c.name.clone())
        });
        let run = exec(&pods, &name, container, hook, field);
        match tokio::time::timeout(hook.timeout, run).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(HookError::Timeout {
                    field,
                    pod: name,
                    timeout: hook.timeout,
                })
            }
        }
        tracing::info!(pod = %name, hook = field, "capture hook ran");
        ran.push(name);
    }
    Ok(ran)
}

async fn exec(
    pods: &Api<Pod>,
    name: &str,
    container: Option<String>,
    hook: &ValidHook,
    field: &'static str,
) -> Result<(), HookError> {
    let exec_err = |message: String| HookError::Exec {
        field,
        pod: name.to_string(),
        message,
    };
    let mut params = AttachParams::default().stdout(true).stderr(true);
    if let Some(container) = container {
        params = params.container(container);
    }
    let mut process = pods
        .exec(name, hook.command.clone(), &params)
        .await
        .map_err(|e| exec_err(e.to_string()))?;
    let status = process
        .take_status()
        .ok_or_else(|| exec_err("no status channel".into()))?;
    // Both streams at once: each has a small pipe, and one left unread would stall the other.
    let (_stdout, stderr) = tokio::join!(drain(process.stdout()), drain(process.stderr()));
    let status = status.await;
    let _ = process.join().await;
    match status {
        Some(s) if s.status.as_deref() == Some("Success") => Ok(()),
        Some(s) => {
            let skip = stderr.chars().count().saturating_sub(400);
            let tail: String = stderr.chars().skip(skip).collect();
            Err(HookError::Failed {
                field,
                pod: name.to_string(),
                message: s.message.unwrap_or_else(|| "no message".into()),
                stderr: tail.trim().to_string(),
            })
        }
        None => Err(exec_err("the exec stream ended without a status".into())),
    }
}

/// Reads a stream of an exec to its end as UTF-8 (what is not UTF-8 is dropped).
async fn drain(pipe: Option<tokio::io::ReadHalf<tokio::io::SimplexStream>>) -> String {
    let mut text = String::new();
    if let Some(mut pipe) = pipe {
        let _ = pipe.read_to_string(&mut text).await;
    }
    text
}
