//! Container probes as the kubelet runs them: readiness (whether the container counts as
//! ready, hence the pod's `Ready` condition and its workload's `readyReplicas`) and liveness
//! (a container failing it is killed and restarted as the pod's `restartPolicy` says).
//!
//! Follows the Kubernetes Probe API (core/v1 `Probe`): `httpGet` (success on a status in
//! 200..400), `tcpSocket` (success when a connection opens) and `exec` (success on exit 0,
//! run in the container); `initialDelaySeconds` (default 0), `periodSeconds` (10),
//! `timeoutSeconds` (1), `successThreshold` (1) and `failureThreshold` (3). `grpc` probes
//! and startup probes are not run (docs/lab.md).

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use axum::body::Body;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// What a probe checks.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// `httpGet`: a GET of `url` (scheme http only), with `headers`.
    Http {
        /// e.g. `http://127.1.1.1:9090/healthz`.
        url: String,
        /// `httpHeaders`, name and value.
        headers: Vec<(String, String)>,
    },
    /// `tcpSocket`: a TCP connection to `host:port`.
    Tcp {
        /// The pod's IP unless the probe names a host.
        host: IpAddr,
        /// The port, resolved from a name through the container's ports.
        port: u16,
    },
    /// `exec`: the command, run in the container (exit 0 is success).
    Exec {
        /// argv.
        command: Vec<String>,
    },
}

/// One probe of one container, with Kubernetes' defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeSpec {
    /// What it checks.
    pub action: Action,
    /// Before the first check, from the container's start.
    pub initial_delay: Duration,
    /// Between checks.
    pub period: Duration,
    /// For one check.
    pub timeout: Duration,
    /// Consecutive successes that make a failing probe pass.
    pub success_threshold: u32,
    /// Consecutive failures that make a passing probe fail.
    pub failure_threshold: u32,
}

fn seconds(value: Option<i32>, default: u64, min: u64) -> Duration {
    Duration::from_secs(
        value
            .map_or(default, |v| u64::try_from(v).unwrap_or(0))
            .max(min),
    )
}

fn threshold(value: Option<i32>, default: u32) -> u32 {
    value.map_or(default, |v| u32::try_from(v).unwrap_or(1).max(1))
}

/// The port a probe names: a number, or the name of one of the container's ports.
fn port(value: &IntOrString, container: &Container) -> Result<u16, String> {
    let number = match value {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => match name.parse::<i32>() {
            Ok(n) => n,
            Err(_) => container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port)
                .ok_or_else(|| {
                    format!(
                        "port {name:?} is not a port of container {}",
                        container.name
                    )
                })?,
        },
    };
    u16::try_from(number).map_err(|_| format!("port {number} out of range"))
}

impl ProbeSpec {
    /// The probe `probe` of `container` in a pod at `pod_ip`.
    ///
    /// # Errors
    /// A message naming the cause when the probe has no supported handler (`grpc`, or none)
    /// or names a port the container does not have.
    pub fn new(probe: &Probe, container: &Container, pod_ip: IpAddr) -> Result<Self, String> {
        let action = if let Some(http) = &probe.http_get {
            if http.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                return Err("httpGet scheme HTTPS is not supported by the lab".into());
            }
            let host = http.host.clone().unwrap_or_else(|| pod_ip.to_string());
            let path = http.path.clone().unwrap_or_else(|| "/".into());
            Action::Http {
                url: format!("http://{host}:{}{path}", port(&http.port, container)?),
                headers: http
                    .http_headers
                    .iter()
                    .flatten()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect(),
            }
        } else if let Some(tcp) = &probe.tcp_socket {
            let host = match &tcp.host {
                Some(h) => h
                    .parse()
                    .map_err(|_| format!("tcpSocket host {h:?}: not an IP"))?,
                None => pod_ip,
            };
            Action::Tcp {
                host,
                port: port(&tcp.port, container)?,
            }
        } else if let Some(exec) = &probe.exec {
            let command = exec.command.clone().unwrap_or_default();
            if command.is_empty() {
                return Err("exec probe without a command".into());
            }
            Action::Exec { command }
        } else {
            return Err(
                "probe without httpGet, tcpSocket or exec (grpc is not run by the lab)".into(),
            );
        };
        Ok(Self {
            action,
            initial_delay: seconds(probe.initial_delay_seconds, 0, 0),
            period: seconds(probe.period_seconds, 10, 1),
            timeout: seconds(probe.timeout_seconds, 1, 1),
            success_threshold: threshold(probe.success_threshold, 1),
            failure_threshold: threshold(probe.failure_threshold, 3),
        })
    }
}

/// Runs one check of `action` within `timeout`; `exec` runs an exec action's command in the
/// container and returns its exit code. `Err` carries why the check failed, as the kubelet's
/// event message would.
pub async fn check<F, Fut>(action: &Action, timeout: Duration, exec: F) -> Result<(), String>
where
    F: FnOnce(Vec<String>, Duration) -> Fut,
    Fut: Future<Output = Result<i32, String>>,
{
    let attempt = async {
        match action {
            Action::Http { url, headers } => {
                let client = Client::builder(TokioExecutor::new()).build_http::<Body>();
                let mut request = axum::http::Request::get(url.as_str());
                for (name, value) in headers {
                    request = request.header(name.as_str(), value.as_str());
                }
                let request = request.body(Body::empty()).map_err(|e| e.to_string())?;
                let response = client
                    .request(request)
                    .await
                    .map_err(|e| format!("Get {url:?}: {e}"))?;
                let status = response.status().as_u16();
                if (200..400).contains(&status) {
                    Ok(())
                } else {
                    Err(format!("HTTP probe failed with statuscode: {status}"))
                }
            }
            Action::Tcp { host, port } => tokio::net::TcpStream::connect((*host, *port))
                .await
                .map(drop)
                .map_err(|e| format!("dial tcp {host}:{port}: {e}")),
            Action::Exec { command } => match exec(command.clone(), timeout).await? {
                0 => Ok(()),
                code => Err(format!("command {command:?} exited with {code}")),
            },
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("probe timed out after {timeout:?}")))
}

/// A probe's verdict over consecutive checks, per its thresholds.
#[derive(Debug)]
pub struct Verdict {
    passing: bool,
    streak: u32,
}

impl Verdict {
    /// Before the first check: readiness starts failing, liveness passing (as in Kubernetes).
    pub fn new(passing: bool) -> Self {
        Self { passing, streak: 0 }
    }

    /// Records one check; returns whether the probe now passes.
    pub fn record(&mut self, spec: &ProbeSpec, ok: bool) -> bool {
        if ok == self.passing {
            self.streak = 0;
            return self.passing;
        }
        self.streak += 1;
        let needed = if ok {
            spec.success_threshold
        } else {
            spec.failure_threshold
        };
        if self.streak >= needed {
            self.passing = ok;
            self.streak = 0;
        }
        self.passing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(probe: serde_json::Value) -> (Container, Probe) {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "app", "ports": [{"name": "metrics", "containerPort": 9090}],
        }))
        .unwrap();
        (c, serde_json::from_value(probe).unwrap())
    }

    #[test]
    fn defaults_and_named_ports_follow_kubernetes() {
        let ip: IpAddr = "127.1.1.1".parse().unwrap();
        let (c, p) =
            container(serde_json::json!({"httpGet": {"path": "/healthz", "port": "metrics"}}));
        let spec = ProbeSpec::new(&p, &c, ip).unwrap();
        assert_eq!(
            spec.action,
            Action::Http {
                url: "http://127.1.1.1:9090/healthz".into(),
                headers: vec![]
            }
        );
        assert_eq!(
            (spec.period, spec.timeout, spec.failure_threshold),
            (Duration::from_secs(10), Duration::from_secs(1), 3)
        );
        let (c, p) = container(serde_json::json!({"tcpSocket": {"port": "nope"}}));
        let err = ProbeSpec::new(&p, &c, ip).unwrap_err();
        assert!(
            err.contains("\"nope\" is not a port of container app"),
            "{err}"
        );
        let (c, p) = container(serde_json::json!({"grpc": {"port": 1}}));
        assert!(ProbeSpec::new(&p, &c, ip).is_err());
    }

    #[test]
    fn thresholds_need_consecutive_results() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (c, p) = container(
            serde_json::json!({"exec": {"command": ["true"]}, "successThreshold": 2, "failureThreshold": 2}),
        );
        let spec = ProbeSpec::new(&p, &c, ip).unwrap();
        let mut v = Verdict::new(false);
        assert!(!v.record(&spec, true));
        assert!(v.record(&spec, true));
        assert!(v.record(&spec, false));
        assert!(v.record(&spec, true));
        assert!(v.record(&spec, false));
        assert!(!v.record(&spec, false));
    }
}
