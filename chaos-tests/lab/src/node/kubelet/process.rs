//! Container processes: spawning one in its own process group (as root in a private mount
//! namespace, as its user), stop signals, exit codes.

use super::*;

/// A process's exit code, or 128 + the signal that ended it, as a shell reports it.
pub(super) fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(9))
}

/// Resolves once the pod's stop has been requested.
pub(super) async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, so callers' futures stay `Send`.
    let _ = stopped.wait_for(|s| *s).await;
}

/// The image's stop signal (`stop_signal`, e.g. `TERM`) to the process group, SIGKILL after
/// `grace_seconds`; returns the exit status.
pub(super) async fn terminate(
    pid: u32,
    stop_signal: &str,
    grace_seconds: u64,
    child: &mut tokio::process::Child,
) -> Option<std::process::ExitStatus> {
    signal_group(stop_signal, pid);
    match tokio::time::timeout(Duration::from_secs(grace_seconds), child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            signal_group("KILL", pid);
            child.wait().await.ok()
        }
    }
}

pub(super) fn signal_group(sig: &str, pgid: u32) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .status();
}

/// Whether this process runs as root (pods then get private mount namespaces).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Quotes a string for `sh`.
pub(super) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub(super) fn spawn(c: &Prepared) -> Result<tokio::process::Child, PodError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&c.log)
        .map_err(|source| PodError::Files {
            path: c.log.clone(),
            source,
        })?;
    let log_err = log.try_clone().map_err(|source| PodError::Files {
        path: c.log.clone(),
        source,
    })?;
    let mut argv: Vec<String> = vec![c.launch.program.to_string_lossy().into_owned()];
    argv.extend(c.launch.args.iter().cloned());
    let mut cmd = if is_root() {
        // Private mount namespace: bind every volume at its mountPath, then drop privileges.
        let mut script = String::from("set -e\n");
        for m in &c.mounts {
            let target = sh_quote(&m.path);
            if m.device {
                script.push_str(&format!(
                    "mkdir -p \"$(dirname {target})\"; touch {target}\n"
                ));
            } else {
                script.push_str(&format!("mkdir -p {target}\n"));
            }
            script.push_str(&format!(
                "mount --bind {} {target}\n",
                sh_quote(&m.host.to_string_lossy())
            ));
            if m.read_only {
                script.push_str(&format!("mount -o remount,bind,ro {target}\n"));
            }
        }
        if let Some(dir) = &c.working_dir {
            script.push_str(&format!("mkdir -p {0}; cd {0}\n", sh_quote(dir)));
        }
        let exec = argv
            .iter()
            .map(|a| sh_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
        match c.run_as {
            Some((uid, gid)) => {
                let gid = gid.unwrap_or(uid);
                script.push_str(&format!(
                    "exec setpriv --reuid={uid} --regid={gid} --clear-groups -- {exec}\n"
                ));
            }
            None => script.push_str(&format!("exec {exec}\n")),
        }
        let mut cmd = tokio::process::Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &script,
        ]);
        cmd
    } else {
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        if let Some(dir) = &c.working_dir {
            cmd.current_dir(dir);
        }
        cmd
    };
    container_env_only(&mut cmd, &c.env)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .kill_on_drop(false);
    cmd.spawn().map_err(|source| PodError::Spawn {
        container: c.name.clone(),
        source,
    })
}
