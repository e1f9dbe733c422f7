//! Running a command in a pod's container through the `pods/exec` subresource (Kubernetes API
//! reference, "Pod v1 / connect exec"), the way capture hooks and drill verifications do.

use k8s_openapi::api::core::v1::Pod;
use kube::api::AttachParams;
use kube::Api;
use tokio::io::AsyncReadExt;

/// What a finished exec said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecResult {
    /// Whether the command exited 0 (the API's `Success` status).
    pub success: bool,
    /// The API's message for a failure (e.g. `command terminated with non-zero exit code`).
    pub message: String,
    /// The last `keep_bytes` bytes of stdout, lossily decoded (not UTF-8 never cuts a stream).
    pub stdout: String,
    /// The same of stderr.
    pub stderr: String,
}

/// Runs `command` in `container` (the pod's only one when `None`) of pod `name`, reading stdout
/// and stderr together (a pipe left unread would stall the other) and keeping the last
/// `keep_bytes` of each.
///
/// # Errors
/// A message when the exec cannot start (pod gone, container unknown, no permission) or its
/// stream ends without a status.
pub async fn run(
    pods: &Api<Pod>,
    name: &str,
    container: Option<&str>,
    command: &[String],
    keep_bytes: usize,
) -> Result<ExecResult, String> {
    let mut params = AttachParams::default().stdout(true).stderr(true);
    if let Some(container) = container {
        params = params.container(container);
    }
    let mut process = pods
        .exec(name, command.to_vec(), &params)
        .await
        .map_err(|e| e.to_string())?;
    let status = process
        .take_status()
        .ok_or_else(|| "the exec has no status channel".to_string())?;
    let (stdout, stderr) = tokio::join!(
        tail(process.stdout(), keep_bytes),
        tail(process.stderr(), keep_bytes)
    );
    let status = status.await;
    let _ = process.join().await;
    match status {
        Some(s) => Ok(ExecResult {
            success: s.status.as_deref() == Some("Success"),
            message: s.message.unwrap_or_default(),
            stdout,
            stderr,
        }),
        None => Err("the exec stream ended without a status".into()),
    }
}

/// Reads `pipe` to its end, keeping its last `keep` bytes (at most twice that in memory).
async fn tail(pipe: Option<tokio::io::ReadHalf<tokio::io::SimplexStream>>, keep: usize) -> String {
    let mut kept: Vec<u8> = Vec::new();
    if let Some(mut pipe) = pipe {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf).await {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > 2 * keep {
                kept.drain(..kept.len() - keep);
            }
        }
    }
    if kept.len() > keep {
        kept.drain(..kept.len() - keep);
    }
    String::from_utf8_lossy(&kept).into_owned()
}
