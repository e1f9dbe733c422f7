//! The kubelet's side of `pods/exec`: a command in a running container, with its
//! environment and, as root, in its mount namespace as its user.

use super::*;

/// The kubelet's side of `pods/exec`: runs a command in a running container of a pod (the
/// one named, or the pod's only container), with the container's environment and, as root,
/// inside its mount namespace (`nsenter`) as its user, so paths such as a volume's
/// `mountPath` resolve as in the container. Without root it runs on the host with the
/// container's (rewritten) environment. The command has [`EXEC_TIMEOUT`] to finish; the
/// caller's own timeout should be shorter. Errors use the API server's and kubelet's wording.
pub struct KubeletExec(pub Arc<NodeContext>);

/// Longest an exec may run before the kubelet kills it.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(300);

impl crate::apiserver::exec::ExecBackend for KubeletExec {
    fn exec(
        &self,
        namespace: String,
        pod: String,
        container: Option<String>,
        command: Vec<String>,
    ) -> crate::apiserver::exec::ExecFuture {
        let ctx = self.0.clone();
        Box::pin(async move {
            use lab_apimachinery::status::ApiError;
            let target = {
                let pods = ctx.running.pods.lock().expect("kubelet lock poisoned");
                let running = pods
                    .values()
                    .find(|r| r.namespace == namespace && r.name == pod)
                    .ok_or_else(|| ApiError::not_found("", "pods", &pod))?;
                let name = match (container, running.containers.as_slice()) {
                    (Some(c), names) if names.contains(&c) => c,
                    (Some(c), _) => {
                        return Err(ApiError::bad_request(format!(
                            "container {c} is not valid for pod {pod}"
                        )))
                    }
                    (None, [only]) => only.clone(),
                    (None, names) => {
                        return Err(ApiError::bad_request(format!(
                            "a container name must be specified for pod {pod}, choose one of: [{}]",
                            names.join(" ")
                        )))
                    }
                };
                let target = running
                    .exec
                    .lock()
                    .expect("kubelet lock poisoned")
                    .get(&name)
                    .cloned();
                target.ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "unable to upgrade connection: container not found (\"{name}\")"
                    ))
                })?
            };
            let output =
                tokio::time::timeout(EXEC_TIMEOUT, container_command(&target, &command).output())
                    .await
                    .map_err(|_| {
                        ApiError::internal(format!("command {command:?} ran over {EXEC_TIMEOUT:?}"))
                    })?
                    .map_err(|e| {
                        ApiError::internal(format!("starting {:?} in pod {pod}: {e}", command[0]))
                    })?;
            Ok(crate::apiserver::exec::ExecOutput {
                stdout: output.stdout,
                stderr: output.stderr,
                exit_code: exit_code(output.status),
            })
        })
    }
}

/// `command` as it runs in container `target`: as root inside the container's mount
/// namespace, as its user; its environment only, stdin closed, killed when dropped.
pub(super) fn container_command(
    target: &ExecTarget,
    command: &[String],
) -> tokio::process::Command {
    // The image's own program by its name (or path), as the container's PATH would find it.
    let resolved: Vec<String>;
    let command = match (&target.image_program, command.first()) {
        (Some((name, argv)), Some(first))
            if std::path::Path::new(first).file_name() == Some(std::ffi::OsStr::new(name)) =>
        {
            resolved = argv.iter().chain(&command[1..]).cloned().collect();
            &resolved[..]
        }
        _ => command,
    };
    let mut cmd = if is_root() {
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.args(["--target", &target.pid.to_string(), "--mount", "--"]);
        if let Some((uid, gid)) = target.run_as {
            let gid = gid.unwrap_or(uid);
            cmd.args([
                "setpriv".to_string(),
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "--".into(),
            ]);
        }
        cmd.args(command);
        cmd
    } else {
        let mut cmd = tokio::process::Command::new(&command[0]);
        cmd.args(&command[1..]);
        cmd
    };
    if let Some(dir) = &target.working_dir {
        cmd.current_dir(dir);
    }
    container_env_only(&mut cmd, &target.env)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Gives `cmd` exactly the container's environment `env`, plus the host's `PATH` (the lab's
/// processes run the host's binaries).
pub(super) fn container_env_only<'c>(
    cmd: &'c mut tokio::process::Command,
    env: &BTreeMap<String, String>,
) -> &'c mut tokio::process::Command {
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .envs(env)
}
