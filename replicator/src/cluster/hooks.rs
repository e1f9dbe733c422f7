//! Capture hooks: `spec.hooks.preCapture` runs in every running pod of the app before the
//! volume snapshots are taken, `postCapture` right after they are cut, through the
//! Kubernetes `pods/exec` subresource (as Velero's backup hooks do). A pre-capture hook that
//! fails (non-zero exit, timeout, pod gone) fails the capture; the post-capture hook still
//! runs, so an app the pre-hook half-quiesced is resumed.

use std::time::Duration;

use ferry_schemas::validation::ValidHook;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

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
    let result = ferry_runtime::exec::run(pods, name, container.as_deref(), &hook.command, 400)
        .await
        .map_err(exec_err)?;
    if result.success {
        return Ok(());
    }
    Err(HookError::Failed {
        field,
        pod: name.to_string(),
        message: if result.message.is_empty() {
            "no message".into()
        } else {
            result.message
        },
        stderr: result.stderr.trim().to_string(),
    })
}
