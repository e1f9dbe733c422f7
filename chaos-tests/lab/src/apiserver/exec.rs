//! `pods/exec`: runs a command in a pod's container, as the apiserver does by proxying to the
//! kubelet, over the WebSocket remote-command protocol `v4.channel.k8s.io` (what kube-rs
//! `Api::<Pod>::exec` and kubectl speak).
//!
//! The output is collected and sent when the command ends: channel 1 stdout, channel 2
//! stderr, then channel 3 a `metav1.Status` (`Success`, or `Failure` with reason
//! `NonZeroExitCode` and the exit code as a cause), as `k8s.io/apiserver`'s wsstream and the
//! kubelet's remotecommand send them. stdin and tty are not supported (the lab runs hooks,
//! not shells).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use lab_apimachinery::status::ApiError;
use serde_json::json;

use super::ApiState;

/// The subprotocol the lab speaks.
pub const PROTOCOL: &str = "v4.channel.k8s.io";

/// What a finished command produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
    /// Its exit code (128 + signal when killed).
    pub exit_code: i32,
}

/// A boxed future of an exec.
pub type ExecFuture = Pin<Box<dyn Future<Output = Result<ExecOutput, ApiError>> + Send>>;

/// Runs commands in the containers of this site's pods: the node's side of `pods/exec`.
pub trait ExecBackend: Send + Sync {
    /// Runs `command` in container `container` (the first when `None`) of pod
    /// `namespace/pod`.
    ///
    /// # Errors
    /// `ApiError` NotFound for an unknown pod or container, BadRequest when it is not
    /// running, InternalError when the command cannot be started.
    fn exec(
        &self,
        namespace: String,
        pod: String,
        container: Option<String>,
        command: Vec<String>,
    ) -> ExecFuture;
}

/// The namespace and pod of a `/api/v1/namespaces/{ns}/pods/{name}/exec` path.
pub fn exec_target(path: &str) -> Option<(String, String)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["api", "v1", "namespaces", ns, "pods", name, "exec"] => {
            Some((ns.to_string(), name.to_string()))
        }
        _ => None,
    }
}

/// Serves one exec request (already authenticated): upgrades to WebSocket and runs the
/// command through the site's backend.
pub async fn serve(
    state: Arc<ApiState>,
    mut parts: Parts,
    namespace: String,
    pod: String,
) -> Response {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(parts.uri.query().unwrap_or("")).unwrap_or_default();
    let command: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    let container = pairs
        .iter()
        .find(|(k, _)| k == "container")
        .map(|(_, v)| v.clone());
    let flag = |key: &str| pairs.iter().any(|(k, v)| k == key && v == "true");
    if command.is_empty() {
        return super::error_response(&ApiError::bad_request(
            "you must specify at least 1 command",
        ));
    }
    if flag("stdin") || flag("tty") {
        return super::error_response(&ApiError::bad_request(
            "the lab's exec supports stdout and stderr only (no stdin, no tty)",
        ));
    }
    let Some(backend) = state.exec.get().cloned() else {
        return super::error_response(&ApiError::service_unavailable(
            "this site's node is not running: no exec",
        ));
    };
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(rejection) => return rejection.into_response(),
    };
    upgrade
        .protocols([PROTOCOL])
        .on_upgrade(move |socket| async move {
            let result = backend.exec(namespace, pod, container, command).await;
            let _ = send_result(socket, result).await;
        })
}

fn frame(channel: u8, bytes: &[u8]) -> Message {
    let mut data = Vec::with_capacity(bytes.len() + 1);
    data.push(channel);
    data.extend_from_slice(bytes);
    Message::Binary(data.into())
}

async fn send_result(
    mut socket: WebSocket,
    result: Result<ExecOutput, ApiError>,
) -> Result<(), axum::Error> {
    let status = match result {
        Ok(out) => {
            if !out.stdout.is_empty() {
                socket.send(frame(1, &out.stdout)).await?;
            }
            if !out.stderr.is_empty() {
                socket.send(frame(2, &out.stderr)).await?;
            }
            if out.exit_code == 0 {
                json!({"metadata": {}, "status": "Success"})
            } else {
                json!({"metadata": {}, "status": "Failure",
                    "message": format!("command terminated with non-zero exit code: exit status {}", out.exit_code),
                    "reason": "NonZeroExitCode",
                    "details": {"causes": [{"reason": "ExitCode", "message": out.exit_code.to_string()}]}})
            }
        }
        Err(e) => e.to_status_json(),
    };
    socket
        .send(frame(3, &serde_json::to_vec(&status).unwrap_or_default()))
        .await?;
    socket.send(Message::Close(None)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_paths() {
        assert_eq!(
            exec_target("/api/v1/namespaces/shop/pods/ledger-1/exec"),
            Some(("shop".into(), "ledger-1".into()))
        );
        assert_eq!(exec_target("/api/v1/namespaces/shop/pods/ledger-1"), None);
        assert_eq!(
            exec_target("/api/v1/namespaces/shop/pods/ledger-1/attach"),
            None
        );
    }
}
